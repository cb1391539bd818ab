"""Waiting for a condition of the outside world, always with a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10,
    what: str = "condition",
    *,
    interval: float = 0.05,
) -> None:
    """Poll `predicate` every `interval` s until true; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
