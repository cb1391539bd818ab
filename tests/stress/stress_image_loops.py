"""kill -9 of the daemon at random moments while it attaches image files through loop devices
of its own (docs/images.md), and a restart each time.

Image files sit in a search path; random attach, detach and switch requests (spool), entries
replaced by rename, and `personalityctl refresh` run while a background killer sends SIGKILL at
a random moment, also in the first second after a start. After each restart, once every
request is answered:

- before any Refresh, the daemon's loop devices are its adopted ones: `losetup --json` rows
  backed by this test's files are one per attached personality (draining ones from a killed
  change must go within a generous deadline), none for the others, and each attached
  personality shows one of the versions its entry held;
- after a Refresh, the stack is the desired list at the entries' current versions (files read
  through the stack), on exactly one loop device each, backed by the entry's current file.

At the end, a switch to nothing and a stop leave no loop device backed by the test's files:
the rows are those before the test (none); and the daemon never took one of its own loop
devices for a block device volume (no `volume_refused` in its log).

`STRESS_SEED` replays a run's choices (the seed is printed; where the kills fall among them
depends on timing); `STRESS_IMAGE_KILLS` sets the number of kills (default 30: about 90 s on
two loaded cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from image_entries import install, search_dir

from testkit.daemon import Daemon
from testkit.dbus import ADDRESS_ENV, private_system_bus
from testkit.images import build_image
from testkit.polling import wait_for
from testkit.processes import run
from testkit.spool import drop, spool_answers, wait_answered
from testkit.stack import desired_of, expect_stack, expected_view

KILLS = int(os.environ.get("STRESS_IMAGE_KILLS", "30"))
NAMES = ["img1", "img2", "img3", "img4"]
VERSIONS = 3
SHARED = "usr/bin/shared-tool"
# A start is killed within this many seconds of it half of the time (while it adopts and
# reconciles), else at a random moment of the work that follows.
EARLY_KILL = 1.0
LATE_KILL = 4.0

Tree = dict[str, bytes]


def tree_of(name: str, version: int) -> Tree:
    """The files of `name` at `version`: its own, one in /etc, one that all of them share."""
    tag = f"{name} v{version}"
    tree = {f"usr/share/{name}/f{i:02d}": f"{tag} file {i}\n".encode() for i in range(8)}
    tree[f"etc/{name}.conf"] = f"{tag}\n".encode()
    tree[SHARED] = f"#!/bin/sh\necho {tag}\n".encode()
    return tree


def rows_under(directory: Path) -> list[dict[str, Any]]:
    """`losetup --json` rows (name, back-file, back-ino) whose backing file is under
    `directory`, a replaced (deleted) file included."""
    out = run("losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO").strip()
    rows: list[dict[str, Any]] = json.loads(out)["loopdevices"] if out else []
    prefix = str(directory) + "/"
    return [r for r in rows if str(r.get("back-file") or "").startswith(prefix)]


def entry_of(row: Mapping[str, Any], directory: Path) -> str:
    """The entry name a row's backing file had (`img1` of `.../img1.raw (deleted)`)."""
    back = str(row["back-file"])[len(str(directory)) + 1 :]
    return back.split(".raw", 1)[0]


def personalityctl(daemon: Daemon, *args: str, timeout: float = 120) -> int:
    """`personalityctl ARGS` on the daemon's bus; its exit status (it may meet a dead daemon)."""
    proc = subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", *args],
        env={**os.environ, **daemon.env}, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    return proc.returncode


class Killer:
    """SIGKILL of the daemon's process `delay` seconds from now, from a thread (`done` is set
    once it was sent).

    The main thread must not reap the daemon (`poll`, `wait`) until `join()`: the PID
    signalled is then always the daemon's, alive or a zombie, never a reused one."""

    def __init__(self, daemon: Daemon, delay: float) -> None:
        assert daemon.proc is not None
        self._proc = daemon.proc
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(delay,), daemon=True)
        self._thread.start()

    def _run(self, delay: float) -> None:
        time.sleep(delay)
        self._proc.send_signal(signal.SIGKILL)
        self.done.set()

    def join(self) -> None:
        self._thread.join()


class Scenario:
    """The test's side: the entries (name -> current version), the requests dropped."""

    def __init__(self, daemon: Daemon, directory: Path, builds: dict[tuple[str, int], Path],
                 rng: random.Random) -> None:  # fmt: skip
        self.daemon = daemon
        self.directory = directory
        self.builds = builds
        self.rng = rng
        self.current = dict.fromkeys(NAMES, 1)
        self.seen: dict[str, set[int]] = {n: {1} for n in NAMES}
        self.stems: list[str] = []
        for name in NAMES:
            install(builds[(name, 1)], directory, f"{name}.raw")

    def trees(self) -> dict[str, Tree]:
        return {n: tree_of(n, v) for n, v in self.current.items()}

    def random_step(self, step: str) -> None:
        rng = self.rng
        kind = rng.choices(["request", "replace", "refresh"], weights=[6, 2, 1])[0]
        if kind == "replace":
            name = rng.choice(NAMES)
            version = self.current[name] % VERSIONS + 1
            install(self.builds[(name, version)], self.directory, f"{name}.raw")
            self.current[name] = version
            self.seen[name].add(version)
        elif kind == "refresh":
            personalityctl(self.daemon, "refresh", timeout=60)
        else:
            action = rng.choice(["switch", "switch", "attach", "detach"])
            if action == "switch":
                body: dict[str, Any] = {"personalities": rng.sample(NAMES, rng.randint(0, 3))}
            else:
                body = {"personality": rng.choice(NAMES)}
            drop(self.daemon.spool_dir, step, {"action": action, "id": step, **body})
            self.stems.append(step)

    def chaos(self, cycle: int, killer: Killer) -> None:
        """Random steps, a short random pause between them, until the killer has struck."""
        step = 0
        while not killer.done.is_set():
            if self.daemon.spool_dir.is_dir():
                self.random_step(f"c{cycle:02d}-{step:03d}")
                step += 1
            killer.done.wait(self.rng.uniform(0.0, 0.3))

    def check_adopted(self) -> list[str]:
        """After a restart, before a Refresh: one loop device per attached personality,
        showing a version its entry held; none for the others. The desired list."""
        daemon = self.daemon
        wait_answered(daemon.spool_dir, self.stems, timeout=300)
        # No state file yet: nothing was ever changed, the desired list is empty.
        desired = desired_of(daemon) if (daemon.state_dir / "state.json").exists() else []

        def one_each() -> bool:
            rows = rows_under(self.directory)
            return sorted(entry_of(r, self.directory) for r in rows) == sorted(desired)

        wait_for(one_each, timeout=120,
                 what=f"one loop device per attached personality of {desired}: "
                      f"{rows_under(self.directory)}")  # fmt: skip
        root = daemon.root
        for name in desired:
            content = (root / f"etc/{name}.conf").read_bytes()
            assert content in {f"{name} v{v}\n".encode() for v in self.seen[name]}, content
        for name in set(NAMES) - set(desired):
            assert not (root / f"etc/{name}.conf").exists(), f"{name} not desired, but shows"
        return desired

    def check_refreshed(self, desired: list[str]) -> None:
        """After a Refresh: the current versions through the stack, each on exactly one loop
        device backed by the entry's current file."""
        trees = self.trees()
        expect_stack(self.daemon, desired, trees)
        view = expected_view(desired, trees)
        if desired:
            assert (self.daemon.root / SHARED).read_bytes() == view[SHARED]
        current = {str(self.directory / f"{n}.raw"): os.stat(self.directory / f"{n}.raw").st_ino
                   for n in desired}  # fmt: skip

        def exactly_current() -> bool:
            rows = rows_under(self.directory)
            return sorted((r["back-file"], int(r["back-ino"])) for r in rows) == sorted(
                current.items()
            )

        wait_for(exactly_current, timeout=120,
                 what=f"the loop devices of {desired} on their current files, the old ones "
                      f"released: {rows_under(self.directory)}")  # fmt: skip


def build_versions(tmp_path: Path) -> dict[tuple[str, int], Path]:
    return {
        (name, version): build_image(tmp_path, name, tree_of(name, version))
        for name in NAMES
        for version in range(1, VERSIONS + 1)
    }


def start_and_kill(daemon: Daemon, scenario: Scenario, cycle: int,
                   rng: random.Random) -> None:  # fmt: skip
    """Start the daemon (killed early in half of the cycles), run the chaos, kill it."""
    early = rng.random() < 0.5
    daemon.start(wait=not early, timeout=120)
    killer = Killer(daemon, rng.uniform(0.0, EARLY_KILL if early else LATE_KILL))
    try:
        scenario.chaos(cycle, killer)
    finally:
        killer.join()
        daemon.kill9()  # reaps it (already dead from the killer's signal)


def converge(daemon: Daemon, scenario: Scenario, refresh: Callable[[], None]) -> list[str]:
    daemon.start(timeout=120)
    desired = scenario.check_adopted()
    refresh()
    scenario.check_refreshed(desired)
    return desired


def test_kill9_adopts_own_loops_and_releases_the_rest(daemon: Daemon, tmp_path: Path) -> None:
    seed = int(os.environ.get("STRESS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"seed {seed}")
    directory = search_dir(daemon.root)
    before = rows_under(directory)
    assert before == []
    builds = build_versions(tmp_path)
    with private_system_bus(set_env=False) as address:
        daemon.env[ADDRESS_ENV] = address
        scenario = Scenario(daemon, directory, builds, rng)

        def refresh() -> None:
            # The bus name may lag the spool after a start: try again until it answers.
            wait_for(lambda: personalityctl(daemon, "refresh") == 0, timeout=120,
                     what="personalityctl refresh to succeed", interval=0.5)  # fmt: skip

        for cycle in range(KILLS):
            start_and_kill(daemon, scenario, cycle, rng)
            desired = converge(daemon, scenario, refresh)
            print(f"cycle {cycle}: desired {desired}, versions {scenario.current}")
            daemon.kill9()  # once more, at rest: the next cycle starts from a killed daemon

        daemon.start(timeout=120)
        wait_answered(daemon.spool_dir, scenario.stems, timeout=300)
        spool_answers(daemon.spool_dir, scenario.stems)  # each answered exactly once
        result = daemon.request({"action": "switch", "personalities": []}, timeout=120)
        assert result["status"] == "ok", result
        wait_for(lambda: rows_under(directory) == [], timeout=120,
                 what=f"every loop device released: {rows_under(directory)}")  # fmt: skip
        assert daemon.stop() == 0
    assert rows_under(directory) == before
    log = daemon.log_text()
    assert "Traceback" not in log
    # Only this test's loop devices match the daemon's rules, and all of them are its own.
    refused = [line for line in log.splitlines() if "event=volume_refused" in line]
    assert refused == [], refused[:5]
