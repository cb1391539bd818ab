"""Group names to numeric ids, from the system's group database (NSS)."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable

DEFAULT_GROUPS = ("personality",)


def personality_group_gids(names: Iterable[str] = DEFAULT_GROUPS) -> frozenset[int]:
    """The gids of the groups called `names`; a group that does not exist is left out.

    Looked up on every call, so a group created while the daemon runs is honoured at once.
    NSS may be slow (LDAP, sssd): call it off the event loop.
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

    A fallback for when the bus cannot tell a connection's real groups: this is the user's
    configured membership, which a process may have dropped. Empty for an unknown uid.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
