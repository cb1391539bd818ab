"""sd_notify: tell the service manager we are ready, what we do, and that we are alive.

Every call is a no-op returning False when NOTIFY_SOCKET is unset (not started by systemd
with Type=notify) or systemd-python is missing; a failing notification is logged, never raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog


def _load_notify() -> Callable[..., object] | None:
    try:
        from systemd.daemon import notify
    except ImportError:  # systemd-python missing: nothing to notify
        return None
    function: Callable[..., object] = notify
    return function


_notify = _load_notify()

log = structlog.get_logger(__name__)


def notify(state: str) -> bool:
    """Send one raw notification ("READY=1\\nSTATUS=..."); True when it was delivered."""
    if _notify is None or not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        return bool(_notify(state))
    except OSError as e:
        log.warning("notify_failed", state=state.split("=", 1)[0], error=str(e))
        return False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    state = "READY=1"
    if status_text is not None:
        state += f"\nSTATUS={_one_line(status_text)}"
    return notify(state)


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds within which the service manager expects `watchdog()`, or None when the
    watchdog is off or meant for another process (WATCHDOG_PID). Ping at half this."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
