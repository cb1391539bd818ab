"""The NSS lookups' one worker: answers shared while in flight, the order kept."""

from __future__ import annotations

import asyncio
import os
import threading

from personalityd.adapters.groups import _Lookups, lookup_user_gids, user_gids


class SlowLookup:
    """A lookup that records each call and holds the worker until released."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = threading.Event()

    def __call__(self, uid: int) -> frozenset[int]:
        self.calls.append(uid)
        self.release.wait(30)
        return frozenset({uid})


async def test_requests_asking_the_latest_lookup_again_share_its_answer() -> None:
    lookups, slow = _Lookups(), SlowLookup()
    tasks = [asyncio.create_task(lookups.run(slow, 7)) for _ in range(50)]
    await asyncio.sleep(0.05)
    slow.release.set()
    answers = await asyncio.gather(*tasks)
    assert answers == [frozenset({7})] * 50
    assert slow.calls == [7]


async def test_a_different_lookup_in_between_is_not_jumped() -> None:
    lookups, slow = _Lookups(), SlowLookup()
    finished: list[str] = []

    async def ask(label: str, uid: int) -> None:
        await lookups.run(slow, uid)
        finished.append(label)

    tasks = [asyncio.create_task(ask(label, uid)) for label, uid in
             (("a", 1), ("b", 2), ("c", 1), ("d", 1))]  # fmt: skip
    await asyncio.sleep(0.05)
    slow.release.set()
    await asyncio.gather(*tasks)
    # c may not share a's answer (b was asked for in between); d shares c's.
    assert slow.calls == [1, 2, 1]
    assert finished == ["a", "b", "c", "d"]


async def test_one_cancelled_waiter_does_not_cancel_the_others() -> None:
    lookups, slow = _Lookups(), SlowLookup()
    first = asyncio.create_task(lookups.run(slow, 3))
    second = asyncio.create_task(lookups.run(slow, 3))
    await asyncio.sleep(0.05)
    first.cancel()
    slow.release.set()
    assert await second == frozenset({3})


async def test_a_finished_lookup_is_asked_again() -> None:
    lookups, slow = _Lookups(), SlowLookup()
    slow.release.set()
    await lookups.run(slow, 5)
    await lookups.run(slow, 5)
    assert slow.calls == [5, 5]


async def test_the_real_lookup_gives_roots_groups() -> None:
    assert await lookup_user_gids(0) == user_gids(0)
    assert os.getgrouplist("root", 0)[0] in await lookup_user_gids(0)
