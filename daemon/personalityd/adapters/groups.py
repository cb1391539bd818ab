"""The system's user and group databases (NSS), looked up off the event loop.

NSS may be slow (LDAP, sssd), so every lookup runs in a worker thread. There is one worker:
lookups finish in the order they were asked for, so requests that wait for one reach the
manager's queue in the order they arrived (the spool relies on it).

A lookup asked for while the same lookup is the latest one still in flight shares its answer
instead of queueing another: a burst of spool requests from one owner then costs a few thread
hops, not two per request, and the order is kept (nothing else was asked for in between).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

DEFAULT_GROUPS = ("personality",)

_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nss")


def group_gids(names: Iterable[str] = DEFAULT_GROUPS) -> frozenset[int]:
    """The gids of the groups called `names`; a group that does not exist is left out.

    Looked up on every call, so a group created while the daemon runs is honoured at once.
    """
    gids: set[int] = set()
    for name in names:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return frozenset(gids)


def user_gids(uid: int) -> frozenset[int]:
    """The primary and supplementary groups the group database gives user `uid`.

    For a spool file's owner, and for a bus peer whose groups the bus cannot tell. Empty for
    an unknown uid.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


class _Lookups:
    """The worker's queue of lookups, sharing the answer of the latest one while in flight."""

    def __init__(self) -> None:
        self._latest: tuple[Hashable, asyncio.Future[frozenset[int]]] | None = None

    async def run(self, function: Callable[[T], frozenset[int]], argument: T) -> frozenset[int]:
        key = (function, argument)
        loop = asyncio.get_running_loop()
        latest = self._latest
        if latest is not None:
            latest_key, future = latest
            if latest_key == key and not future.done() and future.get_loop() is loop:
                # shield: one waiter cancelled (its caller went away) must not cancel the rest
                return await asyncio.shield(future)
        future = loop.run_in_executor(_worker, function, argument)
        self._latest = (key, future)
        return await asyncio.shield(future)


_lookups = _Lookups()


async def lookup_group_gids(names: Iterable[str]) -> frozenset[int]:
    return await _lookups.run(group_gids, tuple(names))


async def lookup_user_gids(uid: int) -> frozenset[int]:
    return await _lookups.run(user_gids, uid)
