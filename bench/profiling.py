"""With BENCH_PROFILE=1: py-spy samples the daemon while a figure is taken."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

from settings import DATA
from testkit.daemon import Daemon
from testkit.paths import REPO


@contextlib.contextmanager
def profiled(daemon: Daemon, name: str, seconds: float) -> Iterator[None]:
    """py-spy on the daemon meanwhile, into bench/data/profiles/<name>.txt (collapsed stacks;
    `bench/profile_top.py` sums them). Without BENCH_PROFILE=1, nothing."""
    if os.environ.get("BENCH_PROFILE") != "1" or daemon.pid is None:
        yield
        return
    out = DATA / "profiles" / f"{name}.txt"
    out.parent.mkdir(exist_ok=True)
    spy = shutil.which("py-spy", path=str(REPO / ".venv" / "bin")) or "py-spy"
    proc = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(daemon.pid), "--format", "raw", "--rate", "500"),
            *("--duration", str(int(seconds) + 1), "--output", str(out), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        proc.wait(timeout=seconds + 30)
