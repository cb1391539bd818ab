"""index: the daemon's indexer on freshly mounted 100,000-file volumes, against `find`."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from dataset import Recipe, big_recipes
from harness import Env
from personalityd.adapters.indexer import index_volume_packed
from progress import log
from record import Benchmark, Json, Row, measured
from settings import BIG_FILES, RUN_DIR, RUNS


def count_entries(top: Path) -> int:
    """What `find TOP` prints, counted (outside the timed run)."""
    out = subprocess.run(["find", str(top)], capture_output=True, check=True).stdout
    return out.count(b"\n")


def _fresh_mount(env: Env, recipe: Recipe, mnt: Path) -> None:
    subprocess.run(
        ["mount", "-t", recipe.fmt, "-o", "ro,nodev,nosuid", env.devices[recipe.name], mnt],
        check=True,
    )


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)


def _time_find(env: Env, recipe: Recipe, mnt: Path) -> tuple[float, int]:
    """(seconds, entries) of `find` on a fresh mount."""
    _fresh_mount(env, recipe, mnt)
    started = time.monotonic()
    subprocess.run(["find", str(mnt)], stdout=subprocess.DEVNULL, check=True)
    seconds = time.monotonic() - started
    entries = count_entries(mnt)
    _umount(mnt)
    return seconds, entries


def _time_index(env: Env, recipe: Recipe, mnt: Path) -> tuple[float, int]:
    """(seconds, entries) of the daemon's indexer on a fresh mount."""
    _fresh_mount(env, recipe, mnt)
    started = time.monotonic()
    index = index_volume_packed(str(mnt), ["/usr", "/etc"])
    seconds = time.monotonic() - started
    entries = sum(len(t) for t in index.values())
    del index
    _umount(mnt)
    return seconds, entries


def measure(env: Env) -> list[Row]:
    recipes = big_recipes()
    env.attach(recipes)
    mnt = RUN_DIR / "index-mnt"
    mnt.mkdir(exist_ok=True)
    ours: list[float] = []
    ref: list[float] = []
    ratios: list[float] = []
    per_volume: dict[str, Json] = {}
    for run in range(RUNS):
        for recipe in recipes:
            find_s, find_entries = _time_find(env, recipe, mnt)
            index_s, entries = _time_index(env, recipe, mnt)
            find_rate, index_rate = find_entries / find_s, entries / index_s
            ref.append(find_rate)
            ours.append(index_rate)
            ratios.append(index_rate / find_rate)
            runs = per_volume.setdefault(recipe.name, [])
            assert isinstance(runs, list)
            runs.append(
                {"fmt": recipe.fmt, "find_s": find_s, "index_s": index_s, "entries": entries}
            )
            log(
                f"index run {run + 1} {recipe.name} ({recipe.fmt}): find {find_rate:,.0f}/s, "
                f"indexer {index_rate:,.0f}/s"
            )
    env.detach(recipes)
    return [
        measured(
            "index",
            f"indexing throughput on freshly mounted {BIG_FILES:,}-file volumes (squashfs, erofs)",
            "paths/s",
            ours,
            reference=("find over the same (freshly mounted) volume", ref),
            goal="at least 0.6x find's files per second",
            met=statistics.median(ratios) >= 0.6,
            notes="the daemon's indexer (adapters/indexer.py) called in-process; each tool on "
            "its own fresh mount of the same loop device",
            ratios=ratios,
            extra={"per_volume": per_volume},
        )
    ]


BENCHMARK = Benchmark("index", big_recipes, measure)
