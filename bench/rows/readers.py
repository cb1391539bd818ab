"""readers: errors a reader sees during switches, against a naive umount-then-mount swap."""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import timed_switch
from dataset import STACK_A, STACK_B, stack_recipes
from harness import Env
from progress import log
from record import Benchmark, Json, Row, measured
from settings import HELPERS, READER_RUNS, READER_SWITCHES, RUN_DIR
from testkit.daemon import Daemon
from testkit.mounts import unmount_tree
from testkit.sandbox import make_sandbox_root


def _reader(path: Path, stop: Path) -> subprocess.Popen[str]:
    stop.unlink(missing_ok=True)
    return subprocess.Popen(
        [sys.executable, str(HELPERS), "reader", str(path), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _reader_result(proc: subprocess.Popen[str], stop: Path) -> dict[str, Any]:
    stop.touch()
    out, _ = proc.communicate(timeout=60)
    stop.unlink(missing_ok=True)
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass(frozen=True)
class NaiveOverlay:
    """The reference's overlay: the same layers, mounted by us on a target of our own."""

    target: Path  # the overlay's mount point (its /usr)
    vols: Path  # one mount per volume under here
    base: Path  # a copy of the base's /usr

    def layers(self, names: Sequence[str]) -> str:
        """lowerdir= for a stack (bottom first): top layer first, the base last."""
        return ":".join([*(str(self.vols / n / "usr") for n in reversed(names)), str(self.base)])


@contextlib.contextmanager
def naive_overlay(env: Env, top: Path) -> Iterator[NaiveOverlay]:
    """The stacks' volumes mounted under `top`, stack A as an overlay; all unmounted after."""
    make_sandbox_root(top / "base-root")
    overlay = NaiveOverlay(top / "usr", top / "vol", top / "base-usr")
    shutil.copytree(top / "base-root" / "usr", overlay.base)
    try:
        for recipe in stack_recipes():
            (overlay.vols / recipe.name).mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    *("mount", "-t", recipe.fmt, "-o", "ro,nodev,nosuid"),
                    *(env.devices[recipe.name], overlay.vols / recipe.name),
                ],
                check=True,
            )
        overlay.target.mkdir(exist_ok=True)
        lower = overlay.layers(STACK_A)
        subprocess.run(
            ["mount", "-t", "overlay", "naive", "-o", f"ro,lowerdir={lower}", overlay.target],
            check=True,
        )
        yield overlay
    finally:
        unmount_tree(top)


def _one_run(daemon: Daemon, shared: Path, naive: NaiveOverlay, stop: Path) -> dict[str, Any]:
    """A reader during READER_SWITCHES switches by the daemon, then during as many naive swaps."""
    proc = _reader(shared, stop)
    time.sleep(0.2)
    switch_s = [
        timed_switch(daemon, STACK_A if i % 2 == 0 else STACK_B) for i in range(READER_SWITCHES)
    ]
    ours = _reader_result(proc, stop)
    proc = _reader(naive.target / "lib" / "bench" / "shared.txt", stop)
    time.sleep(0.2)
    naive_out = subprocess.run(
        [
            *(sys.executable, str(HELPERS), "naive-swap", str(naive.target)),
            *(str(READER_SWITCHES), naive.layers(STACK_A), naive.layers(STACK_B)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    reference = _reader_result(proc, stop)
    return {
        "personalityd_reader": ours,
        "naive_reader": reference,
        "personalityd_switch_s_median": statistics.median(switch_s),
        "naive_swap_s_median": statistics.median(json.loads(naive_out)["swap_seconds"]),
    }


def _errors(reader: dict[str, Any]) -> int:
    count: int = reader["error_count"] + reader["mismatches"]
    return count


def measure(env: Env) -> list[Row]:
    env.attach(stack_recipes())
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    stop = RUN_DIR / "reader-stop"
    shared = env.root / "usr" / "lib" / "bench" / "shared.txt"
    ours: list[float] = []
    ref: list[float] = []
    details: list[Json] = []
    with naive_overlay(env, RUN_DIR / "naive") as naive:
        for run in range(READER_RUNS):
            detail = _one_run(daemon, shared, naive, stop)
            ours.append(_errors(detail["personalityd_reader"]))
            ref.append(_errors(detail["naive_reader"]))
            details.append(detail)
            log(
                f"readers run {run + 1}: personalityd {ours[-1]:.0f} errors in "
                f"{detail['personalityd_reader']['reads']} reads; naive {ref[-1]:.0f} in "
                f"{detail['naive_reader']['reads']}"
            )
    return [
        measured(
            "readers",
            f"errors seen by a process reading a shared file during {READER_SWITCHES} switches",
            "errors",
            ours,
            reference=(
                "naive swap: umount2(MNT_DETACH) then mount(2) of the new overlay, same layers",
                ref,
            ),
            goal="0 errors (the naive swap shows thousands)",
            met=max(ours) == 0,
            notes="errors = failed opens/reads plus reads whose bytes differ; the file is "
            "provided by every personality of both stacks and is not in the base",
            ratios=[],
            extra={"runs": details},
        )
    ]


BENCHMARK = Benchmark("readers", stack_recipes, measure)
