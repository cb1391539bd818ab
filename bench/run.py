"""personalityd benchmarks against their references, each measured in the same run.

    python bench/run.py [ROW ...]          (as root; `make bench`; BENCH_QUICK=1 for a short run)

Rows: stack, switch, hotplug, index, readers, memory, spool, dbus, layers (default: all).
Writes bench/results.json and bench/results.md. See docs/bench.md for what each row does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    DATA,
    IMAGES,
    REPO,
    Recipe,
    build_all,
    ensure_private_namespace,
    log,
    quick,
    summary,
)

ensure_private_namespace()

from testkit.daemon import Daemon  # noqa: E402
from testkit.dbus import private_system_bus  # noqa: E402
from testkit.loops import LoopDevices  # noqa: E402
from testkit.mounts import mountinfo, unmount_tree  # noqa: E402
from testkit.processes import stop_pid  # noqa: E402
from testkit.sandbox import make_sandbox_root  # noqa: E402
from testkit.udev import ensure_udevd, udev_settle, udev_tag_rule  # noqa: E402

QUICK = quick()
RUNS = 3 if QUICK else 5
STACK_FILES = 2_000 if QUICK else 10_000
BIG_FILES = 20_000 if QUICK else 100_000
HOT_FILES = 1_000
READER_SWITCHES = 30 if QUICK else 100
READER_RUNS = 2 if QUICK else RUNS
SPOOL_REQUESTS = 1_000
DBUS_SECONDS = 5.0 if QUICK else 10.0
DBUS_RUNS = 2 if QUICK else RUNS
LAYERS = 500

RUN_DIR = DATA / "run"
HELPERS = REPO / "bench" / "helpers.py"
BUS_NAME = "org.personalityd.personality1"
OBJECT_PATH = "/org/personalityd/personality1"
INTERFACE = "org.personalityd.personality1.Manager"

STACK_A = ["stk1", "stk2", "stk3"]
STACK_B = ["stk4", "stk5", "stk6"]


def stack_recipes() -> list[Recipe]:
    fmts = ["squashfs", "erofs"]
    return [
        Recipe(n, STACK_FILES, fmts[i % 2], conflicts=50, shared=True, etc=True)
        for i, n in enumerate(STACK_A + STACK_B)
    ]


def big_recipes() -> list[Recipe]:
    fmts = ["squashfs", "erofs", "squashfs"]
    return [Recipe(f"big{i + 1}", BIG_FILES, fmts[i], deep=True) for i in range(3)]


HOT = Recipe("hot", HOT_FILES, "squashfs")


def layer_recipes() -> list[Recipe]:
    return [Recipe(f"lay{i:03d}", 1, "squashfs") for i in range(LAYERS)]


# --------------------------------------------------------------------------------------------
# the environment: udev tagging, loop devices, a sandbox root, a private D-Bus, daemons


class Env:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        if RUN_DIR.exists():
            unmount_tree(RUN_DIR)
            shutil.rmtree(RUN_DIR)
        RUN_DIR.mkdir(parents=True)
        self.udevd = ensure_udevd()
        if self.udevd is not None:
            stack.callback(stop_pid, self.udevd, "systemd-udevd")
        self.token = f"bench{os.getpid()}-{uuid.uuid4().hex[:6]}"
        stack.enter_context(udev_tag_rule(self.token, IMAGES.resolve()))
        self.loops = LoopDevices()
        stack.callback(self.loops.cleanup)
        stack.callback(unmount_tree, RUN_DIR)
        self.bus_address = stack.enter_context(private_system_bus(set_env=False))
        self.devices: dict[str, str] = {}  # image name -> loop device
        self.daemon: Daemon | None = None
        self.root = RUN_DIR / "root"
        stack.callback(self.stop_daemon)

    # loop devices

    def attach(self, recipes: Sequence[Recipe], settle: bool = True) -> None:
        for recipe in recipes:
            if recipe.name in self.devices:
                continue
            dev = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", str(recipe.image)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            self.loops.attached[dev] = recipe.image.resolve()
            self.devices[recipe.name] = dev
        if settle:
            udev_settle(120)

    def detach(self, recipes: Sequence[Recipe]) -> None:
        for recipe in recipes:
            dev = self.devices.pop(recipe.name, None)
            if dev is not None:
                self.loops.detach(dev, settle=False)
        udev_settle(120)

    # the daemon

    def fresh_root(self) -> None:
        """Stop the daemon, unmount what it left, and start from an empty desired list."""
        self.stop_daemon()
        for watch in _watches.values():
            watch.close()
        _watches.clear()
        if self.root.exists():
            unmount_tree(self.root)
            shutil.rmtree(self.root)
        make_sandbox_root(self.root)
        # /run is a tmpfs on every systemd host: the runtime files (stack record, conflict
        # report) are written there, so the sandbox gets one too.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "run", self.root / "run"], check=True
        )

    def start_daemon(self, *, dbus: bool = False, fresh: bool = True) -> Daemon:
        if fresh:
            self.fresh_root()
        else:
            self.stop_daemon()
        env = {"PERSONALITYD_LOG_LEVEL": "info"}
        if dbus:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus_address
        else:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/personalityd-bench-no-bus"
        daemon = Daemon(self.root, RUN_DIR, udev_token=self.token, env=env, name="personalityd")
        daemon.start(timeout=600)
        self.daemon = daemon
        if dbus:
            wait_until(lambda: "dbus_serving" in daemon.log_text(), 30, "the daemon on D-Bus")
        return daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=30)
            self.daemon = None

    def rss(self) -> int:
        assert self.daemon is not None and self.daemon.pid is not None
        text = Path(f"/proc/{self.daemon.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024

    def rebuilds(self) -> int:
        assert self.daemon is not None
        return self.daemon.log_text().count("event=stack_changed")


@contextlib.contextmanager
def profiled(daemon: Daemon, name: str, seconds: float) -> Iterator[None]:
    """With BENCH_PROFILE=1: py-spy samples the daemon meanwhile, into
    bench/data/profiles/<name>.txt (collapsed stacks; `bench/profile_top.py` sums them)."""
    if os.environ.get("BENCH_PROFILE") != "1" or daemon.pid is None:
        yield
        return
    out = DATA / "profiles" / f"{name}.txt"
    out.parent.mkdir(exist_ok=True)
    spy = shutil.which("py-spy", path=str(REPO / ".venv" / "bin")) or "py-spy"
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(daemon.pid),
            "--format",
            "raw",
            "--rate",
            "500",
            "--duration",
            str(int(seconds) + 1),
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        proc.wait(timeout=seconds + 30)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------
# a spool client with a tight poll


def drop_request(spool: Path, body: dict[str, Any], name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    tmp = spool / f".tmp-{name}"
    tmp.write_text(json.dumps(body))
    tmp.rename(spool / f"{name}.json")
    return name


_libc = ctypes.CDLL(None, use_errno=True)
IN_MOVED_TO = 0x80
IN_CLOSE_WRITE = 0x8
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


class ResultWatch:
    """inotify on done/ and failed/: the client sleeps until a result is renamed in, instead
    of polling (a polling client would take CPU from the daemon it measures)."""

    def __init__(self, spool: Path) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for where in ("done", "failed"):
            wd = _libc.inotify_add_watch(
                self.fd, str(spool / where).encode(), IN_MOVED_TO | IN_CLOSE_WRITE
            )
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {spool / where}")

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 65536):
                    pass

    def close(self) -> None:
        os.close(self.fd)


_watches: dict[Path, ResultWatch] = {}


def wait_result(spool: Path, name: str, timeout: float = 300) -> dict[str, Any]:
    watch = _watches.get(spool)
    if watch is None:
        watch = _watches[spool] = ResultWatch(spool)
    done = spool / "done" / f"{name}.result.json"
    failed = spool / "failed" / f"{name}.result.json"
    deadline = time.monotonic() + timeout
    while True:
        for path in (done, failed):
            try:
                result: dict[str, Any] = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            result["_dir"] = path.parent.name
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no result for spool request {name} after {timeout} s")
        watch.wait(min(remaining, 0.5))


def request(daemon: Daemon, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    return wait_result(daemon.spool_dir, drop_request(daemon.spool_dir, body), timeout)


def timed_switch(daemon: Daemon, names: Sequence[str], timeout: float = 600) -> float:
    started = time.monotonic()
    result = request(daemon, {"action": "switch", "personalities": list(names)}, timeout)
    elapsed = time.monotonic() - started
    if result["status"] != "ok" or list(result["attached"]) != list(names):
        raise RuntimeError(f"switch to {names} failed: {result}")
    return elapsed


# --------------------------------------------------------------------------------------------
# systemd-sysext on a sandbox root


class Sysext:
    """`systemd-sysext --root=DIR` with the given images in DIR/var/lib/extensions.

    Without systemd as PID 1 it works once /run is a mount point (it remounts /run MS_SLAVE
    in its child) and the root is a shared mount (the child's overlay must propagate back to
    us): both arranged here, inside our private mount namespace only.
    """

    def __init__(self) -> None:
        self.root = RUN_DIR / "sysext-root"
        make_sandbox_root(self.root)
        self.extensions = self.root / "var" / "lib" / "extensions"
        self.extensions.mkdir(parents=True, exist_ok=True)
        if not any(mp == "/run" for mp, _, _ in mountinfo()):
            subprocess.run(["mount", "--bind", "/run", "/run"], check=True)
        subprocess.run(["mount", "--bind", str(self.root), str(self.root)], check=True)
        subprocess.run(["mount", "--make-rshared", str(self.root)], check=True)

    def use(self, recipes: Sequence[Recipe]) -> None:
        """Put copies of these images (and no others) in var/lib/extensions.

        Copies, so that the backing files of sysext's own loop devices are outside
        bench/data/images and the daemon's udev tag never matches them; sysext 252 ignores
        symlinks there. Unused copies wait in var/lib/extensions.off (a rename away)."""
        off = self.extensions.with_name("extensions.off")
        off.mkdir(exist_ok=True)
        for old in self.extensions.iterdir():
            old.rename(off / old.name)
        for recipe in recipes:
            name = f"{recipe.name}.raw"
            if not (off / name).exists():
                shutil.copyfile(recipe.image, off / name)
            (off / name).rename(self.extensions / name)

    def _run(self, verb: str) -> float:
        started = time.monotonic()
        proc = subprocess.run(
            ["systemd-sysext", verb, f"--root={self.root}"], capture_output=True, text=True
        )
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"systemd-sysext {verb} failed: {proc.stderr.strip()}")
        return elapsed

    def merge(self) -> float:
        return self._run("merge")

    def refresh(self) -> float:
        return self._run("refresh")

    def unmerge(self) -> float:
        return self._run("unmerge")

    def shows(self, recipe: Recipe) -> bool:
        return (self.root / "usr" / "share" / f"bench-{recipe.name}").is_dir()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.unmerge()
        unmount_tree(self.root)


# --------------------------------------------------------------------------------------------
# rows


def row(
    key: str,
    figure: str,
    unit: str,
    ours: Sequence[float],
    ref: Sequence[float] | None,
    ref_name: str | None,
    goal: str,
    met: bool | None,
    notes: str = "",
    ratios: Sequence[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if ratios is None and ref is not None:
        ratios = [a / b for a, b in zip(ours, ref, strict=False) if b]
    return {
        "key": key,
        "figure": figure,
        "unit": unit,
        "personalityd": summary(ours),
        "reference": None if ref is None else {"what": ref_name, **summary(ref)},
        "ratio": None if ratios is None else summary(ratios),
        "goal": goal,
        "met": met,
        "notes": notes,
        **({"extra": extra} if extra else {}),
    }


def row_stack(env: Env) -> dict[str, Any]:
    recipes = stack_recipes()[:3]
    env.attach(stack_recipes())
    sysext = Sysext()
    ours: list[float] = []
    ref: list[float] = []
    try:
        sysext.use(recipes)
        for run in range(RUNS):
            ref.append(sysext.merge())
            assert all(sysext.shows(r) for r in recipes), "sysext merge did not show the files"
            sysext.unmerge()
            daemon = env.start_daemon()
            time.sleep(1.0)  # past start-up (the D-Bus attempt, lazy imports): a running daemon
            with profiled(daemon, f"stack-{run + 1}", 2):
                ours.append(timed_switch(daemon, STACK_A))
            log(f"stack run {run + 1}: personalityd {ours[-1]:.3f} s, sysext {ref[-1]:.3f} s")
    finally:
        sysext.close()
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    return row(
        "stack",
        f"stack 3 personalities of {STACK_FILES:,} files each (mount, index, conflicts, "
        "overlays, journal)",
        "s",
        ours,
        ref,
        "systemd-sysext merge --root (no conflict detection; /usr only in systemd 252)",
        "at most 0.5x sysext's time",
        statistics.median(ratios) <= 0.5,
        "personalityd: a switch spool request to a freshly started daemon (1 s after it is ready; "
        "volumes probed, nothing mounted or indexed), to its result file; it stacks /usr and "
        "/etc and journals 52 conflicts; the 3 volumes are indexed side by side",
        ratios,
    )


def row_switch(env: Env) -> list[dict[str, Any]]:
    recipes = stack_recipes()
    env.attach(recipes)
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    sysext = Sysext()
    ours: list[float] = []
    ref: list[float] = []
    reorder: list[float] = []
    try:
        sysext.use(recipes[:3])
        sysext.merge()
        for run in range(RUNS):
            target = STACK_A if run % 2 == 0 else STACK_B
            sysext.use(recipes[:3] if run % 2 == 0 else recipes[3:])
            ref.append(sysext.refresh())
            ours.append(timed_switch(daemon, target))
            log(f"switch run {run + 1}: personalityd {ours[-1]:.3f} s, sysext {ref[-1]:.3f} s")
        for run in range(RUNS):
            names = STACK_B if run % 2 == 0 else list(reversed(STACK_B))
            reorder.append(timed_switch(daemon, names))
    finally:
        sysext.close()
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    reorder_ratios = [a / b for a, b in zip(reorder, ref, strict=True)]
    return [
        row(
            "switch",
            "switch between two disjoint 3-personality stacks (volumes known and indexed)",
            "s",
            ours,
            ref,
            "systemd-sysext refresh (the other 3 images put in place beforehand)",
            "at most 0.3x",
            statistics.median(ratios) <= 0.3,
            "personalityd unmounts the 3 old volumes and mounts the 3 new ones in each switch",
            ratios,
        ),
        row(
            "switch_reorder",
            "switch to a reordered stack of the same 3 personalities (all volumes mounted)",
            "s",
            reorder,
            ref,
            "systemd-sysext refresh (same runs as above)",
            "at most 0.3x",
            statistics.median(reorder_ratios) <= 0.3,
            "",
            reorder_ratios,
        ),
    ]


def count_entries(top: Path) -> int:
    """What `find TOP` prints, counted (outside the timed run)."""
    out = subprocess.run(["find", str(top)], capture_output=True, check=True).stdout
    return out.count(b"\n")


def row_index(env: Env) -> dict[str, Any]:
    from personalityd.adapters.indexer import index_volume_packed

    recipes = big_recipes()
    env.attach(recipes)
    mnt = RUN_DIR / "index-mnt"
    mnt.mkdir(exist_ok=True)
    ours: list[float] = []
    ref: list[float] = []
    ratios: list[float] = []
    per_volume: dict[str, Any] = {}

    def fresh_mount(recipe: Recipe) -> None:
        subprocess.run(
            ["mount", "-t", recipe.fmt, "-o", "ro,nodev,nosuid", env.devices[recipe.name], mnt],
            check=True,
        )

    def umount() -> None:
        subprocess.run(["umount", str(mnt)], check=True)

    for run in range(RUNS):
        for recipe in recipes:
            fresh_mount(recipe)
            started = time.monotonic()
            subprocess.run(["find", str(mnt)], stdout=subprocess.DEVNULL, check=True)
            find_s = time.monotonic() - started
            find_entries = count_entries(mnt)
            umount()
            fresh_mount(recipe)
            started = time.monotonic()
            index = index_volume_packed(str(mnt), ["/usr", "/etc"])
            index_s = time.monotonic() - started
            entries = sum(len(t) for t in index.values())
            del index
            umount()
            find_rate, index_rate = find_entries / find_s, entries / index_s
            ref.append(find_rate)
            ours.append(index_rate)
            ratios.append(index_rate / find_rate)
            per_volume.setdefault(recipe.name, []).append(
                {"fmt": recipe.fmt, "find_s": find_s, "index_s": index_s, "entries": entries}
            )
            log(
                f"index run {run + 1} {recipe.name} ({recipe.fmt}): find {find_rate:,.0f}/s, "
                f"indexer {index_rate:,.0f}/s"
            )
    env.detach(recipes)
    return row(
        "index",
        f"indexing throughput on freshly mounted {BIG_FILES:,}-file volumes (squashfs, erofs)",
        "paths/s",
        ours,
        ref,
        "find over the same (freshly mounted) volume",
        "at least 0.6x find's files per second",
        statistics.median(ratios) >= 0.6,
        "the daemon's indexer (adapters/indexer.py) called in-process; each tool on its own "
        "fresh mount of the same loop device",
        ratios,
        {"per_volume": per_volume},
    )


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


def row_readers(env: Env) -> dict[str, Any]:
    recipes = stack_recipes()
    env.attach(recipes)
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    stop = RUN_DIR / "reader-stop"
    shared = env.root / "usr" / "lib" / "bench" / "shared.txt"
    ours: list[float] = []
    ref: list[float] = []
    details: list[dict[str, Any]] = []
    # The naive reference: the same layers, mounted by us on a target of our own.
    naive = RUN_DIR / "naive"
    base = naive / "base-usr"
    make_sandbox_root(naive / "base-root")
    shutil.copytree(naive / "base-root" / "usr", base)
    vols = naive / "vol"
    for recipe in recipes:
        (vols / recipe.name).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                recipe.fmt,
                "-o",
                "ro,nodev,nosuid",
                env.devices[recipe.name],
                vols / recipe.name,
            ],
            check=True,
        )
    target = naive / "usr"
    target.mkdir(exist_ok=True)

    def layers(names: Sequence[str]) -> str:
        return ":".join([*(str(vols / n / "usr") for n in reversed(names)), str(base)])

    subprocess.run(
        ["mount", "-t", "overlay", "naive", "-o", f"ro,lowerdir={layers(STACK_A)}", target],
        check=True,
    )
    try:
        for run in range(READER_RUNS):
            proc = _reader(shared, stop)
            time.sleep(0.2)
            switch_s = []
            for i in range(READER_SWITCHES):
                switch_s.append(timed_switch(daemon, STACK_A if i % 2 == 0 else STACK_B))
            ours_result = _reader_result(proc, stop)
            proc = _reader(target / "lib" / "bench" / "shared.txt", stop)
            time.sleep(0.2)
            naive_out = subprocess.run(
                [
                    sys.executable,
                    str(HELPERS),
                    "naive-swap",
                    str(target),
                    str(READER_SWITCHES),
                    layers(STACK_A),
                    layers(STACK_B),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            naive_result = _reader_result(proc, stop)
            ours.append(ours_result["error_count"] + ours_result["mismatches"])
            ref.append(naive_result["error_count"] + naive_result["mismatches"])
            details.append(
                {
                    "personalityd_reader": ours_result,
                    "naive_reader": naive_result,
                    "personalityd_switch_s_median": statistics.median(switch_s),
                    "naive_swap_s_median": statistics.median(json.loads(naive_out)["swap_seconds"]),
                }
            )
            log(
                f"readers run {run + 1}: personalityd {ours[-1]:.0f} errors in "
                f"{ours_result['reads']} reads; naive {ref[-1]:.0f} in {naive_result['reads']}"
            )
    finally:
        unmount_tree(naive)
    return row(
        "readers",
        f"errors seen by a process reading a shared file during {READER_SWITCHES} switches",
        "errors",
        ours,
        ref,
        "naive swap: umount2(MNT_DETACH) then mount(2) of the new overlay, same layers",
        "0 errors (the naive swap shows thousands)",
        max(ours) == 0,
        "errors = failed opens/reads plus reads whose bytes differ; the file is provided by "
        "every personality of both stacks and is not in the base",
        [],
        {"runs": details},
    )


def row_memory(env: Env) -> list[dict[str, Any]]:
    recipes = big_recipes()
    env.attach(recipes)
    idle: list[float] = []
    per_path: list[float] = []
    paths = 0
    for run in range(RUNS):
        daemon = env.start_daemon()
        time.sleep(2)
        before = env.rss()
        timed_switch(daemon, [r.name for r in recipes], timeout=900)
        time.sleep(2)
        after = env.rss()
        match = re.findall(r"event=volume_indexed name=(\S+) entries=(\d+)", daemon.log_text())
        paths = sum(int(n) for _, n in match[-3:])
        idle.append(before / 2**20)
        per_path.append((after - before) / paths)
        log(f"memory run {run + 1}: idle {before / 2**20:.1f} MiB, {per_path[-1]:.1f} B/path")
    env.stop_daemon()
    env.detach(recipes)
    return [
        row(
            "memory_idle",
            "resident set of the daemon, idle (started, volumes present, nothing attached)",
            "MiB",
            idle,
            None,
            None,
            "under 40 MiB",
            statistics.median(idle) < 40,
        ),
        row(
            "memory_per_path",
            f"resident set per indexed path, 3 x {BIG_FILES:,}-file volumes attached",
            "bytes/path",
            per_path,
            None,
            None,
            "under 40 bytes per path on top of idle",
            statistics.median(per_path) < 40,
            f"{paths:,} paths indexed (every entry under /usr of the 3 volumes)",
        ),
    ]


def row_spool(env: Env) -> dict[str, Any]:
    recipes = stack_recipes()
    env.attach(recipes)
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    bodies: list[dict[str, Any]] = []
    pattern = [
        {"action": "switch", "personalities": STACK_A},
        {"action": "attach", "personality": "stk4"},
        {"action": "detach", "personality": "stk2"},
        {"action": "attach", "personality": "stk5"},
        {"action": "switch", "personalities": ["stk6", "stk5"]},
        {"action": "detach", "personality": "stk6"},
        {"action": "attach", "personality": "stk1"},
    ]
    for i in range(SPOOL_REQUESTS):
        bodies.append({**pattern[i % len(pattern)], "id": f"r{i}"})
    ours: list[float] = []
    rebuild_counts: list[float] = []
    oks: list[int] = []
    for run in range(RUNS):
        spool = daemon.spool_dir
        names = [f"burst{run}-{i:04d}" for i in range(SPOOL_REQUESTS)]
        for name, body in zip(names, bodies, strict=True):
            (spool / f".tmp-{name}").write_text(json.dumps(body))
        rebuilds_before = env.rebuilds()
        started = time.monotonic()
        for name in names:
            (spool / f".tmp-{name}").rename(spool / f"{name}.json")
        results = [wait_result(spool, name, timeout=120) for name in names]
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        rebuilds = env.rebuilds() - rebuilds_before
        ours.append(elapsed)
        rebuild_counts.append(rebuilds)
        oks.append(sum(1 for r in results if r["status"] == "ok"))
        log(f"spool run {run + 1}: {elapsed:.2f} s, {rebuilds} rebuilds, {oks[-1]} ok")
    met = max(ours) < 10 and max(rebuild_counts) <= SPOOL_REQUESTS / 20
    return row(
        "spool",
        f"{SPOOL_REQUESTS:,} spool requests dropped at once (attach/detach/switch mix)",
        "s",
        ours,
        None,
        None,
        "all answered, under 10 s, at most 1 stack rebuild per 20 requests",
        met,
        f"rebuilds per burst: {[int(r) for r in rebuild_counts]}; requests answered ok: {oks}",
        None,
        {"rebuilds": rebuild_counts, "ok": oks},
    )


async def _dbus_clients(address: str, seconds: float, clients: int) -> list[float]:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    buses = [await MessageBus(bus_address=address).connect() for _ in range(clients)]
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(bus: MessageBus) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = await bus.call(
                Message(
                    destination=BUS_NAME,
                    path=OBJECT_PATH,
                    interface=INTERFACE,
                    member="ListPersonalities",
                )
            )
            latencies.append(time.monotonic() - started)
            if reply.message_type is not MessageType.METHOD_RETURN:
                raise RuntimeError(f"ListPersonalities failed: {reply.body}")

    try:
        await asyncio.gather(*(client(b) for b in buses))
    finally:
        for bus in buses:
            bus.disconnect()
    return latencies


def row_dbus(env: Env) -> dict[str, Any]:
    recipes = stack_recipes()
    env.attach(recipes)
    daemon = env.start_daemon(dbus=True)
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    p99s: list[float] = []
    details = []
    for run in range(DBUS_RUNS):
        stop = RUN_DIR / "switcher-stop"
        stop.unlink(missing_ok=True)
        switcher = subprocess.Popen(
            [
                sys.executable,
                str(HELPERS),
                "switcher",
                str(daemon.spool_dir),
                str(stop),
                ",".join(STACK_A),
                ",".join(STACK_B),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            with profiled(daemon, f"dbus-{run + 1}", DBUS_SECONDS):
                latencies = asyncio.run(_dbus_clients(env.bus_address, DBUS_SECONDS, 10))
        finally:
            stop.touch()
            out, _ = switcher.communicate(timeout=120)
        switches = json.loads(out)["switches"] if out.strip() else -1
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        p99s.append(p99)
        details.append(
            {
                "calls": len(latencies),
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": p99,
                "max_ms": latencies[-1] * 1000,
                "switches": switches,
            }
        )
        log(f"dbus run {run + 1}: {details[-1]}")
    return row(
        "dbus",
        f"D-Bus ListPersonalities p99 latency, 10 concurrent clients for {DBUS_SECONDS:g} s, "
        "during switches",
        "ms",
        p99s,
        None,
        None,
        "p99 under 20 ms",
        statistics.median(p99s) < 20,
        "clients: 10 dbus-fast connections in one process on a private dbus-daemon; switches "
        "A<->B back to back through the spool meanwhile",
        None,
        {"runs": details},
    )


async def _watch_stack_changed(address: str, events: list[tuple[float, list[str]]]) -> Any:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()

    def handler(msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.member == "StackChanged":
            events.append((time.monotonic(), list(msg.body[1])))
        return False

    bus.add_message_handler(handler)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',sender='{BUS_NAME}',member='StackChanged'"],
        )
    )
    return bus


class UdevTimes:
    """`udevadm monitor --udev --property` with its CLOCK_MONOTONIC reception stamps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out = open(path, "w")  # noqa: SIM115  # closed in close(), with the monitor
        self.proc = subprocess.Popen(
            ["udevadm", "monitor", "--udev", "--property", "--subsystem-match=block"],
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: "UDEV - the event" in path.read_text(), 10, "udevadm monitor")

    def first(self, action: str, devname: str, after: float, key: str) -> float | None:
        for block in self.path.read_text().split("\n\n"):
            lines = block.strip().splitlines()
            if not lines or not lines[0].startswith("UDEV"):
                continue
            m = re.match(r"UDEV\s+\[(\d+\.\d+)\]\s+(\S+)", lines[0])
            if m is None:
                continue
            stamp = float(m.group(1))
            props = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
            if (
                m.group(2) == action
                and props.get("DEVNAME") == devname
                and key in props
                and stamp >= after
            ):
                return stamp
        return None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.out.close()


def row_hotplug(env: Env) -> dict[str, Any]:
    env.attach([HOT])
    daemon = env.start_daemon(dbus=True)
    timed_switch(daemon, [HOT.name])
    monitor = UdevTimes(RUN_DIR / "udev-monitor.log")
    beyond: list[float] = []
    udev_lat: list[float] = []
    loop = asyncio.new_event_loop()
    events: list[tuple[float, list[str]]] = []
    bus = loop.run_until_complete(_watch_stack_changed(env.bus_address, events))

    def pump_until(pred: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError("no StackChanged signal")
            loop.run_until_complete(asyncio.sleep(0.001))

    try:
        for run in range(RUNS):
            dev = env.devices.pop(HOT.name)
            mark = len(events)
            env.loops.yank(dev)
            gone_from = mark
            pump_until(lambda: any(HOT.name not in a for _, a in events[gone_from:]), 30)  # noqa: B023
            wait_until(lambda: not env.loops.is_ours(dev), 30, "the yanked device to be freed")  # noqa: B023
            udev_settle()
            time.sleep(0.3)
            mark = len(events)
            started = time.monotonic()
            env.attach([HOT], settle=False)
            newdev = env.devices[HOT.name]
            pump_until(lambda: any(HOT.name in a for _, a in events[mark:]), 30)  # noqa: B023
            signal_at = next(t for t, a in events[mark:] if HOT.name in a)
            udev_settle()
            stamp = None
            deadline = time.monotonic() + 5
            while stamp is None and time.monotonic() < deadline:
                stamp = monitor.first("change", newdev, started, "ID_FS_TYPE")
                time.sleep(0.05)
            if stamp is None:
                raise RuntimeError(f"no udev change event with ID_FS_TYPE for {newdev}")
            beyond.append((signal_at - stamp) * 1000)
            udev_lat.append((stamp - started) * 1000)
            log(
                f"hotplug run {run + 1}: udev event {udev_lat[-1]:.1f} ms after losetup, "
                f"StackChanged {beyond[-1]:.1f} ms after the udev event"
            )
    finally:
        bus.disconnect()
        loop.close()
        monitor.close()
    return row(
        "hotplug",
        f"hotplug: loop device attached (volume desired, {HOT_FILES:,} files) to StackChanged",
        "ms beyond udev",
        beyond,
        udev_lat,
        "udev's own event delivery: losetup to the `udevadm monitor` UDEV change stamp (ms)",
        "under 50 ms beyond udev's event, median",
        statistics.median(beyond) < 50,
        "personalityd figure = StackChanged received by a D-Bus client minus the CLOCK_MONOTONIC "
        "stamp `udevadm monitor` gave the UDEV change event; includes probe, mount, index "
        "(new device, new identity), conflicts, overlay, journal",
        [],
    )


def row_layers(env: Env) -> dict[str, Any]:
    recipes = layer_recipes()
    log(f"attaching {len(recipes)} loop devices")
    env.attach(recipes)
    names = [r.name for r in recipes]
    daemon = env.start_daemon()
    notes = []
    t100 = timed_switch(daemon, names[:100], timeout=900)
    shown = len(list((env.root / "usr" / "share").glob("bench-lay*")))
    ok100 = shown == 100
    notes.append(f"100 attached in {t100:.2f} s ({shown} visible)")
    t499 = timed_switch(daemon, names[:499], timeout=900)
    shown = len(list((env.root / "usr" / "share").glob("bench-lay*")))
    ok499 = shown == 499
    notes.append(f"499 attached in {t499:.2f} s ({shown} visible)")
    gen_before = request(daemon, {"action": "attach", "personality": names[0]})["generation"]
    started = time.monotonic()
    result = request(daemon, {"action": "switch", "personalities": names}, timeout=900)
    t500 = time.monotonic() - started
    shown = len(list((env.root / "usr" / "share").glob("bench-lay*")))
    refused = (
        result["status"] == "error"
        and result["generation"] == gen_before
        and shown == 499
        and len(result["attached"]) == 499
    )
    notes.append(
        f"500 personalities (501 layers) refused in {t500:.2f} s: code={result.get('code')!r} "
        f"message={result.get('message')!r}; generation {result['generation']} "
        f"(before {gen_before}), {shown} still visible"
    )
    env.stop_daemon()
    env.fresh_root()
    env.detach(recipes)
    return row(
        "layers",
        "layers: attach 100, then 499 personalities to one hierarchy; then 500",
        "s",
        [t100, t499],
        None,
        None,
        "works; the 501st layer is refused with a clear error, nothing else changes",
        ok100 and ok499 and refused,
        "; ".join(notes),
    )


ROWS: dict[str, Callable[[Env], Any]] = {
    "stack": row_stack,
    "switch": row_switch,
    "hotplug": row_hotplug,
    "index": row_index,
    "readers": row_readers,
    "memory": row_memory,
    "spool": row_spool,
    "dbus": row_dbus,
    "layers": row_layers,
}


def recipes_for(rows: Sequence[str]) -> list[Recipe]:
    needed: list[Recipe] = []
    if {"stack", "switch", "readers", "spool", "dbus"} & set(rows):
        needed += stack_recipes()
    if {"index", "memory"} & set(rows):
        needed += big_recipes()
    if "hotplug" in rows:
        needed.append(HOT)
    if "layers" in rows:
        needed += layer_recipes()
    return needed


# --------------------------------------------------------------------------------------------
# output


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "paths/s":
        return f"{value:,.0f}/s"
    if unit in ("MiB", "bytes/path", "ms", "ms beyond udev"):
        return f"{value:.1f} {unit.split()[0]}"
    return f"{value:g}"


def cell(stats: dict[str, Any] | None, unit: str) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    m, lo, hi = stats["median"], stats["min"], stats["max"]
    return f"{fmt(m, unit)} ({fmt(lo, unit)} to {fmt(hi, unit)})"


def ratio_cell(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median']:.2f}x ({stats['min']:.2f} to {stats['max']:.2f})"


def merged(rows: list[dict[str, Any]], partial: bool) -> list[dict[str, Any]]:
    """With only some rows asked for, the others are kept from the last results.json."""
    path = REPO / "bench" / "results.json"
    if not partial or not path.exists():
        return rows
    new = {r["key"]: r for r in rows}
    old = json.loads(path.read_text()).get("rows", [])
    keep = [new.pop(r["key"], r) for r in old]
    return keep + list(new.values())


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out = REPO / "bench"
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# personalityd benchmark results",
        "",
        f"Measured {meta['date']} on {meta['machine']} (kernel {meta['kernel']}, "
        f"{meta['cpus']} CPUs), {'QUICK mode' if meta['quick'] else 'full run'}; "
        f"`make bench` wrote this file (and `results.json`) in {meta['seconds']:.0f} s.",
        "Each cell: median (min to max) over the runs; ratios are taken per pair of runs "
        "(personalityd / reference) measured one after the other in the same run.",
        "",
        "| figure | personalityd | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = r["unit"]
        ref = r["reference"]
        ref_unit = "ms" if unit == "ms beyond udev" else unit
        ref_text = "-" if ref is None else f"{cell(ref, ref_unit)}: {ref['what']}"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(
            f"| {r['figure']} | {cell(r['personalityd'], unit)} | {ref_text} | "
            f"{ratio_cell(r['ratio'])} | {r['goal']} | {met} |"
        )
    lines += ["", "## Notes per row", ""]
    for r in rows:
        if r.get("notes"):
            lines.append(f"- **{r['key']}**: {r['notes']}")
    analysis = REPO / "bench" / "analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text().rstrip()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--render"]:  # results.md again from results.json (and analysis.md)
        saved = json.loads((REPO / "bench" / "results.json").read_text())
        write_results(saved["rows"], saved["meta"])
        return 0
    wanted = sys.argv[1:] or list(ROWS)
    unknown = [w for w in wanted if w not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
    started = time.monotonic()
    build_all(recipes_for(wanted))
    rows: list[dict[str, Any]] = []
    failures = []
    with contextlib.ExitStack() as stack:
        env = Env(stack)
        for key in wanted:
            log(f"row {key}")
            try:
                result = ROWS[key](env)
            except Exception as exc:  # one broken row must not hide the others
                log(f"row {key} FAILED: {exc!r}")
                failures.append(key)
                result = row(key, key, "-", [], None, None, "", False, f"not measured: {exc!r}")
            finally:
                env.stop_daemon()
            rows += result if isinstance(result, list) else [result]
    write_results(merged(rows, partial=bool(sys.argv[1:])), _meta(started))
    log(f"done in {time.monotonic() - started:.0f} s; wrote bench/results.md and results.json")
    return 1 if failures else 0


def _meta(started: float) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "quick": QUICK,
        "seconds": time.monotonic() - started,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
