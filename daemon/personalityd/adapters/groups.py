"""The system's user and group databases (NSS), looked up off the event loop.

NSS may be slow (LDAP, sssd), so every lookup runs in a worker thread. There is one worker:
lookups finish in the order they were asked for, so requests that wait for one reach the
manager's queue in the order they arrived (the spool relies on it).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

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


async def lookup_group_gids(names: Iterable[str]) -> frozenset[int]:
    names = tuple(names)
    return await asyncio.get_running_loop().run_in_executor(_worker, group_gids, names)


async def lookup_user_gids(uid: int) -> frozenset[int]:
    return await asyncio.get_running_loop().run_in_executor(_worker, user_gids, uid)

