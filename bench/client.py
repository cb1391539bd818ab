"""The benchmark's spool client: a switch, timed from the request to its result file."""

from __future__ import annotations

import time
from collections.abc import Sequence

from testkit.daemon import Daemon
from testkit.spool import ResultWatch, drop, new_name, wait_result


def timed_switch(daemon: Daemon, names: Sequence[str], timeout: float = 600) -> float:
    """Seconds from dropping a `switch` request to its result; RuntimeError unless it worked.

    The client sleeps on inotify until the result is renamed in (a polling client would take
    CPU from the daemon it measures); the watch is set up before the clock starts.
    """
    spool = daemon.spool_dir
    with ResultWatch(spool) as watch:
        name = new_name("b")
        started = time.monotonic()
        drop(spool, name, {"action": "switch", "personalities": list(names)})
        result = wait_result(spool, name, timeout, watch=watch, moved=False)
        elapsed = time.monotonic() - started
    if result["status"] != "ok" or list(result["attached"]) != list(names):
        raise RuntimeError(f"switch to {names} failed: {result}")
    return elapsed
