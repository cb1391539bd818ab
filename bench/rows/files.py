"""files_cold, files_refresh, files_scale: personalities from image files in a search path.

- files_cold: 3 image files of STACK_FILES files in /var/lib/personalities, found (probed)
  by a running daemon and stacked from nothing: a `switch` to them makes their loop devices,
  mounts, indexes, computes the conflicts, builds the overlays, swaps and journals; against
  `systemd-sysext merge` of copies of the same 3 files. `files_cold_start` times the whole
  start instead: a daemon started with the 3 in its saved desired list, to READY=1 (sd_notify),
  Python's start-up and the probes of the files included.
- files_refresh: the middle file of that stack replaced by its next release (renamed over its
  entry), then `Refresh` over D-Bus until the new release is what the stack shows, against
  `systemd-sysext refresh` after the same rename.
- files_scale: SCALE_FILES one-file images in the search path: the time until all are listed,
  the listing (every name, every version), the daemon's VmRSS, and ListPersonalities latency
  from one client, idle and while SCALE_SPARE more entries are moved in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from client import timed_switch
from dataset import Recipe, file_stack_recipes, scale_recipes, updated
from harness import NO_BUS, Env
from profiling import profiled
from progress import log
from record import Benchmark, Json, Row, measured
from settings import DATA, RUN_DIR, RUNS, SCALE_FILES, SCALE_SECONDS, STACK_FILES
from sysext import Sysext
from testkit.daemon import Daemon
from testkit.dbus import manager_message
from testkit.paths import REPO
from testkit.polling import wait_for

# BENCH_BEFORE=COMMIT: that commit's daemon is measured too, in the same runs (A/B).
BEFORE = os.environ.get("BENCH_BEFORE", "")
SEARCH_DIR = "var/lib/personalities"  # one of the default images.search_paths
STATE_DIR = "var/lib/personalityd"  # the default state.dir


Variant = dict[str, str]  # what the daemon's environment gets: {} for this tree


def variants() -> dict[str, Variant]:
    """The daemons measured: "now" (this tree), and "before" with BENCH_BEFORE."""
    found: dict[str, Variant] = {"now": {}}
    if BEFORE:
        found["before"] = {"PYTHONPATH": str(before_tree(BEFORE))}
    return found


def before_tree(commit: str) -> Path:
    """The daemon/ directory of `commit`, extracted once under bench/data."""
    target = DATA / f"before-{commit}"
    if not (target / "daemon" / "personalityd").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "daemon"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "daemon"


def ab_extra(
    now: Sequence[float], before: Sequence[float], ref: Sequence[float] | None
) -> dict[str, Json]:
    """The before figures of an A/B run, for the row's extra fields ({} without them)."""
    if not before:
        return {}
    extra: dict[str, Json] = {"before_commit": BEFORE, "before": list(before)}
    extra["before_median"] = statistics.median(before)
    extra["now_median"] = statistics.median(now)
    if ref:
        extra["before_ratio_median"] = statistics.median(
            [a / b for a, b in zip(before, ref, strict=True)]
        )
    return extra


def search_dir(root: Path) -> Path:
    directory = root / SEARCH_DIR
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    return directory


def stage(image: Path, directory: Path, name: str) -> Path:
    """A root-owned 0644 copy of `image` beside `directory/name`, under a dot name (which is
    never an entry), ready to be renamed in."""
    staged = directory / f".{name}.part"
    shutil.copyfile(image, staged)
    os.chmod(staged, 0o644)
    return staged


def install(image: Path, directory: Path, name: str) -> None:
    os.replace(stage(image, directory, name), directory / name)


def save_desired(root: Path, names: Sequence[str]) -> None:
    """A state.json whose desired list is `names` (what the daemon stacks at start)."""
    state = root / STATE_DIR
    state.mkdir(mode=0o755, parents=True, exist_ok=True)
    desired = ", ".join(f'{{"name": "{n}", "force": false}}' for n in names)
    (state / "state.json").write_text(
        f'{{"version": 1, "generation": 0, "desired": [{desired}]}}\n'
    )


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket for the daemon's sd_notify messages: (its path, the socket)."""
    path = RUN_DIR / "notify.sock"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.settimeout(600)
        yield str(path), sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def wait_ready(sock: socket.socket) -> None:
    while b"READY=1" not in sock.recv(65536).split(b"\n"):
        pass


def shows(root: Path, recipe: Recipe) -> bool:
    """Whether the stack under `root` shows this release of `recipe`."""
    release = root / "usr/lib/extension-release.d" / f"extension-release.{recipe.name}"
    try:
        return f'IMAGE_VERSION="{recipe.key()}"' in release.read_text()
    except OSError:
        return False


def timed_start(env: Env, recipes: Sequence[Recipe], run: int, variant: Variant) -> float:
    """Seconds from starting a daemon whose desired list holds `recipes` (their files in the
    search path, nothing else known) to its READY=1, with the stack in place."""
    env.fresh_root()
    directory = search_dir(env.root)
    for recipe in recipes:
        install(recipe.image, directory, f"{recipe.name}.raw")
    save_desired(env.root, [r.name for r in recipes])
    with notify_socket() as (path, sock):
        daemon = Daemon(
            env.root,
            RUN_DIR,
            udev_token=env.token,
            env={
                "PERSONALITYD_LOG_LEVEL": "info",
                "DBUS_SYSTEM_BUS_ADDRESS": NO_BUS,  # never the host's bus
                "NOTIFY_SOCKET": path,
                **variant,
            },
            name="personalityd",
        )
        started = time.monotonic()
        daemon.start(wait=False)
        env.daemon = daemon
        with profiled(daemon, f"files_cold-{run + 1}", 3):
            wait_ready(sock)
        elapsed = time.monotonic() - started
    daemon.wait_ready(60)
    if not all(shows(env.root, r) for r in recipes):
        raise RuntimeError(f"the daemon was ready without stacking {[r.name for r in recipes]}")
    return elapsed


def timed_found_switch(env: Env, recipes: Sequence[Recipe], variant: Variant) -> float:
    """A switch to `recipes` on a running daemon that has found (probed) their files."""
    env.fresh_root()
    directory = search_dir(env.root)
    for recipe in recipes:
        install(recipe.image, directory, f"{recipe.name}.raw")
    daemon = env.start_daemon(fresh=False, extra_env=variant)
    time.sleep(1.0)  # past start-up, as in the stack row
    return timed_switch(daemon, [r.name for r in recipes])


def measure_cold(env: Env) -> list[Row]:
    recipes = file_stack_recipes()[:3]
    sysext = Sysext(RUN_DIR / "sysext-root")
    starts: dict[str, list[float]] = {v: [] for v in variants()}
    switches: dict[str, list[float]] = {v: [] for v in variants()}
    ref: list[float] = []
    try:
        sysext.use(recipes)
        for run in range(RUNS):
            ref.append(sysext.merge())
            assert all(sysext.shows(r) for r in recipes), "sysext merge did not show the files"
            sysext.unmerge()
            for name, variant in variants().items():
                starts[name].append(timed_start(env, recipes, run, variant))
                switches[name].append(timed_found_switch(env, recipes, variant))
                env.stop_daemon()
                log(
                    f"files_cold run {run + 1} ({name}): start to ready "
                    f"{starts[name][-1]:.3f} s, switch {switches[name][-1]:.3f} s, sysext "
                    f"merge {ref[-1]:.3f} s"
                )
    finally:
        sysext.close()
    ours, switch = starts["now"], switches["now"]
    what = f"3 image files of {STACK_FILES:,} files each"
    reference = ("systemd-sysext merge --root of the same 3 files (copies)", ref)
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    switch_ratios = [a / b for a, b in zip(switch, ref, strict=True)]
    return [
        measured(
            "files_cold",
            f"stack from files, cold: {what}, found in a search path and stacked from nothing",
            "s",
            switch,
            reference=reference,
            goal="at most 0.25x sysext's time",
            met=statistics.median(switch_ratios) <= 0.25,
            notes="a switch spool request to its result file, on a daemon that has found and "
            "probed the 3 files (1 s after READY) and has nothing else: loop devices from "
            "fresh opens (verified), mounts, content keys, indexes, 52 conflicts, overlays "
            "for /usr and /etc, swap, journal",
            ratios=switch_ratios,
            extra=ab_extra(switch, switches.get("before", []), ref),
        ),
        measured(
            "files_cold_start",
            f"daemon start to READY=1 with {what} in its saved desired list",
            "s",
            ours,
            reference=reference,
            goal="- (the goal is the files_cold row's)",
            met=None,
            notes="personalityd: started with the 3 names in its saved desired list and nothing "
            "else (no loop device, no mount, no index), timed from its start to READY=1: "
            "Python start-up, finding and probing the files, loop devices, mounts, indexes, "
            "52 conflicts, overlays for /usr and /etc, swap, journal",
            ratios=ratios,
            extra=ab_extra(ours, starts.get("before", []), ref),
        ),
    ]


# -- files_refresh ------------------------------------------------------------------------


async def _refresh_until(address: str, root: Path, recipe: Recipe, timeout: float) -> None:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(manager_message("Refresh"))
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise RuntimeError(f"Refresh failed: {reply.body}")
        deadline = time.monotonic() + timeout
        while not shows(root, recipe):
            if time.monotonic() > deadline:
                raise RuntimeError(f"release {recipe.release} of {recipe.name} never showed")
            reply = await bus.call(manager_message("Refresh"))
    finally:
        bus.disconnect()


def timed_refresh(
    env: Env, first: Sequence[Recipe], new: Recipe, variant: Variant
) -> tuple[float, float]:
    """A daemon stacking `first` (as image files), then `new` renamed over the entry of its
    release in `first`. Seconds (a) of the Refresh that stacks `new`, called once the daemon
    has found and probed it, as `files_cold` times a switch to files already found; (b) from
    the rename to `new` shown, the probe of the new file included."""
    env.fresh_root()
    directory = search_dir(env.root)
    for recipe in first:
        install(recipe.image, directory, f"{recipe.name}.raw")
    daemon = env.start_daemon(dbus=True, fresh=False, extra_env=variant)
    timed_switch(daemon, [r.name for r in first])
    found = f"event=image_found name={new.name} "
    seen = daemon.log_text().count(found)
    staged = stage(new.image, directory, f"{new.name}.raw")
    with profiled(daemon, "files_refresh", 2):
        renamed = time.monotonic()
        os.replace(staged, directory / f"{new.name}.raw")
        deadline = renamed + 300
        while daemon.log_text().count(found) <= seen:  # the watcher's probe of the new file
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon never found release {new.release}")
            time.sleep(0.002)
        started = time.monotonic()
        asyncio.run(_refresh_until(env.bus_address, env.root, new, 300))
        done = time.monotonic()
    env.stop_daemon()
    return done - started, done - renamed


def measure_refresh(env: Env) -> list[Row]:
    first = file_stack_recipes()[:3]
    middle = first[1]
    releases = [middle, updated(middle)]
    sysext = Sysext(RUN_DIR / "sysext-root")
    times: dict[str, list[float]] = {v: [] for v in variants()}
    whole: dict[str, list[float]] = {v: [] for v in variants()}
    ref: list[float] = []
    entry = f"{middle.name}.raw"
    try:
        sysext.use(first)
        sysext.merge()
        for run in range(RUNS):
            new = releases[(run + 1) % 2]
            staged = stage(new.image, sysext.extensions, entry)
            os.replace(staged, sysext.extensions / entry)
            ref.append(sysext.refresh())
            assert sysext.shows(new) and shows(sysext.root, new), "sysext refresh missed it"
            for name, variant in variants().items():
                refresh, rename = timed_refresh(env, first, updated(middle), variant)
                times[name].append(refresh)
                whole[name].append(rename)
                log(
                    f"files_refresh run {run + 1} ({name}): Refresh {refresh:.3f} s, rename to "
                    f"visible {rename:.3f} s, sysext {ref[-1]:.3f} s"
                )
    finally:
        sysext.close()
    ours = times["now"]
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    return [
        measured(
            "files_refresh",
            f"refresh of one updated file in a stack of 3 ({STACK_FILES:,} files each)",
            "s",
            ours,
            reference=("systemd-sysext refresh after the same rename", ref),
            goal="at most 0.2x sysext's time",
            met=statistics.median(ratios) <= 0.2,
            notes="personalityd: the Refresh over D-Bus that stacks the next release of the "
            "middle entry, called once the daemon has found (probed) the file renamed over it, "
            "to the new release visible in /usr, as files_cold times a switch to files already "
            "found; on a daemon started for each run; sysext's releases alternate between runs",
            ratios=ratios,
            extra=ab_extra(ours, times.get("before", []), ref),
        ),
        measured(
            "files_refresh_rename",
            f"rename of one updated file to its content visible, in a stack of 3 "
            f"({STACK_FILES:,} files each): the probe of the new file, then Refresh",
            "s",
            whole["now"],
            reference=("systemd-sysext refresh after the same rename", ref),
            goal="-",
            met=None,
            notes="the same runs as files_refresh, from the rename: inotify, the probe of the "
            "new file (a loop device, a mount, the walk that checks every file for set-id bits "
            "and builds its index), then the Refresh",
            ratios=[a / b for a, b in zip(whole["now"], ref, strict=True)],
        ),
    ]


# -- files_scale --------------------------------------------------------------------------


async def _list(address: str) -> list[tuple[str, str, str, str, str]]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(manager_message("ListPersonalities"))
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise RuntimeError(f"ListPersonalities failed: {reply.body}")
        return [tuple(row) for row in reply.body[0]]
    finally:
        bus.disconnect()


async def _latencies(address: str, seconds: float) -> list[float]:
    bus = await MessageBus(bus_address=address).connect()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = await bus.call(manager_message("ListPersonalities"))
            latencies.append(time.monotonic() - started)
            if reply.message_type is not MessageType.METHOD_RETURN:
                raise RuntimeError(f"ListPersonalities failed: {reply.body}")
    finally:
        bus.disconnect()
    return latencies


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def _listed_right(rows: Sequence[tuple[str, ...]], recipes: Sequence[Recipe]) -> bool:
    listed = {row[0]: row[2] for row in rows}
    return listed == {r.name: r.key() for r in recipes}


class Mover:
    """Moves the spare entries in and out of the search directory until stopped."""

    def __init__(self, directory: Path, spares: Sequence[Path]) -> None:
        self.directory = directory
        self.spares = spares
        self.moves = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for spare in self.spares:
                name = spare.name.removeprefix(".").removesuffix(".part")
                os.rename(spare, self.directory / name)
                self.moves += 1
                if self._stop.wait(0.05):
                    os.rename(self.directory / name, spare)
                    return
                os.rename(self.directory / name, spare)
                self.moves += 1

    def __enter__(self) -> Mover:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@dataclass
class ScaleRun:
    find: float  # seconds until all were listed
    rss: float  # MiB
    idle: float  # ListPersonalities p99, ms
    busy: float  # the same while entries move
    calls: int
    moves: int


def scale_run(env: Env, run: int, variant: Variant) -> ScaleRun:
    recipes = scale_recipes()
    listed, spares = recipes[:SCALE_FILES], recipes[SCALE_FILES:]
    env.fresh_root()
    directory = search_dir(env.root)
    daemon = env.start_daemon(dbus=True, fresh=False, extra_env=variant)
    staged = [stage(r.image, directory, f"{r.name}.raw") for r in listed]
    started = time.monotonic()
    for path, recipe in zip(staged, listed, strict=True):
        os.replace(path, directory / f"{recipe.name}.raw")

    def listed_right() -> bool:
        return _listed_right(asyncio.run(_list(env.bus_address)), listed)

    wait_for(
        lambda: len(asyncio.run(_list(env.bus_address))) >= SCALE_FILES,
        600,
        f"{SCALE_FILES} entries listed",
        interval=0.05,
    )
    find = time.monotonic() - started
    wait_for(listed_right, 60, "every entry listed with its version", interval=0.2)
    time.sleep(1)
    rss = daemon.rss() / 2**20
    quiet = asyncio.run(_latencies(env.bus_address, SCALE_SECONDS))
    spare_paths = [stage(r.image, directory, f"{r.name}.raw") for r in spares]
    with (
        profiled(daemon, f"files_scale-{run + 1}", SCALE_SECONDS),
        Mover(directory, spare_paths) as mover,
    ):
        moving = asyncio.run(_latencies(env.bus_address, SCALE_SECONDS))
    wait_for(listed_right, 60, "the listing back to the 1,000 entries", interval=0.2)
    rss = max(rss, daemon.rss() / 2**20)
    env.stop_daemon()
    return ScaleRun(find, rss, _p99(quiet), _p99(moving), len(quiet) + len(moving), mover.moves)


def measure_scale(env: Env) -> list[Row]:
    spares = scale_recipes()[SCALE_FILES:]
    runs: dict[str, list[ScaleRun]] = {v: [] for v in variants()}
    for run in range(min(RUNS, 3)):
        for name, variant in variants().items():
            one = scale_run(env, run, variant)
            runs[name].append(one)
            log(
                f"files_scale run {run + 1} ({name}): all listed after {one.find:.2f} s, RSS "
                f"{one.rss:.1f} MiB, ListPersonalities p99 {one.idle:.1f} ms idle, "
                f"{one.busy:.1f} ms while entries move"
            )
    now, before = runs["now"], runs.get("before", [])
    find, rss = [r.find for r in now], [r.rss for r in now]
    idle, busy = [r.idle for r in now], [r.busy for r in now]
    calls, moves = sum(r.calls for r in now), sum(r.moves for r in now)

    def ab(field: str) -> dict[str, Json]:
        return ab_extra([getattr(r, field) for r in now], [getattr(r, field) for r in before], None)

    return [
        measured(
            "files_scale_find",
            f"{SCALE_FILES:,} image files renamed into a watched search path: until all listed",
            "s",
            find,
            goal="all listed, each with its version",
            met=True,  # wait_for above fails the row otherwise
            notes="a running daemon (nothing found yet); ListPersonalities polled every 50 ms",
            extra=ab("find"),
        ),
        measured(
            "files_scale_rss",
            f"resident set of the daemon with {SCALE_FILES:,} image entries found",
            "MiB",
            rss,
            goal="under 60 MiB",
            met=max(rss) < 60,
            notes="the larger of the samples after finding them and after the moves",
            extra=ab("rss"),
        ),
        measured(
            "files_scale_list_idle",
            f"ListPersonalities p99 with {SCALE_FILES:,} entries listed, idle",
            "ms",
            idle,
            goal="under 20 ms",
            met=max(idle) < 20,
            notes=f"one client, calls back to back for {SCALE_SECONDS:.0f} s; {calls:,} calls "
            "in all runs (both figures)",
            extra=ab("idle"),
        ),
        measured(
            "files_scale_list_moving",
            f"ListPersonalities p99 with {SCALE_FILES:,} entries, while entries come and go",
            "ms",
            busy,
            goal="under 20 ms",
            met=max(busy) < 20,
            notes=f"{len(spares)} more image files renamed in and out of the directory every "
            f"50 ms meanwhile ({moves:,} renames in all runs), each one a rescan",
            extra=ab("busy"),
        ),
    ]


BENCHMARK_COLD = Benchmark("files_cold", lambda: file_stack_recipes()[:3], measure_cold)
BENCHMARK_REFRESH = Benchmark("files_refresh", file_stack_recipes, measure_refresh)
BENCHMARK_SCALE = Benchmark("files_scale", scale_recipes, measure_scale)
