"""Rate limits for log lines that other users can cause (refused calls and requests).

At most `burst` lines per key (a caller's uid) in each window of `interval` seconds, as
journald's RateLimitIntervalSec/RateLimitBurst do per service. Lines beyond that are
counted, not written; the first line allowed again carries how many were dropped. Pure: the
caller passes the time.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_BURST = 10
DEFAULT_INTERVAL = 30.0
# Windows kept at most (one per key); beyond it expired ones are forgotten, then the oldest.
DEFAULT_MAX_KEYS = 4096


@dataclass
class _Window:
    start: float
    count: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    suppressed: int  # lines dropped for this key before this one (only when allowed)


class RateLimit:
    def __init__(
        self,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if burst < 1 or interval <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, interval positive")
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[Hashable, _Window] = {}

    def check(self, key: Hashable, now: float) -> Verdict:
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval or now < window.start:
            dropped = window.suppressed if window is not None else 0
            self._windows.pop(key, None)
            self._make_room(now)
            self._windows[key] = _Window(start=now, count=1)
            return Verdict(True, dropped)
        if window.count < self.burst:
            window.count += 1
            return Verdict(True, 0)
        window.suppressed += 1
        return Verdict(False, 0)

    def _make_room(self, now: float) -> None:
        if len(self._windows) < self.max_keys:
            return
        for key in [k for k, w in self._windows.items() if now - w.start >= self.interval]:
            del self._windows[key]
        while len(self._windows) >= self.max_keys:
            del self._windows[next(iter(self._windows))]  # the oldest window
