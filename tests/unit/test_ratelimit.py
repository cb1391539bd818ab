"""The rate limit for log lines other users cause."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core.ratelimit import RateLimit


def test_a_burst_passes_then_lines_are_dropped_and_counted_until_the_next_window() -> None:
    limit = RateLimit(burst=3, interval=10)
    assert [limit.check(7, t).allowed for t in (0, 1, 2, 3, 4)] == [True] * 3 + [False] * 2
    verdict = limit.check(7, 10)
    assert (verdict.allowed, verdict.suppressed) == (True, 2)
    assert limit.check(7, 11).suppressed == 0


def test_each_key_has_its_own_window() -> None:
    limit = RateLimit(burst=1, interval=10)
    assert limit.check(1, 0).allowed
    assert not limit.check(1, 1).allowed
    assert limit.check(2, 1).allowed


def test_the_number_of_windows_is_bounded() -> None:
    limit = RateLimit(burst=1, interval=10, max_keys=100)
    for uid in range(10_000):
        limit.check(uid, 0)
    assert len(limit._windows) <= 100
    assert limit.check(10_000, 0).allowed


def test_a_clock_going_backwards_opens_a_new_window() -> None:
    limit = RateLimit(burst=1, interval=10)
    limit.check(1, 100)
    assert limit.check(1, 50).allowed


@pytest.mark.parametrize("bad", [{"burst": 0}, {"interval": 0}, {"max_keys": 0}])
def test_nonsense_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimit(**bad)  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 100)), max_size=200))
def test_never_more_than_burst_lines_per_key_in_any_window(events: list[tuple[int, float]]) -> None:
    limit = RateLimit(burst=4, interval=10)
    allowed: dict[int, list[float]] = {}
    for key, now in sorted(events, key=lambda e: e[1]):
        if limit.check(key, now).allowed:
            allowed.setdefault(key, []).append(now)
    for times in allowed.values():
        for i, start in enumerate(times):
            assert sum(1 for t in times[i:] if t - start < 10) <= 8  # two windows at most
