"""Who may change the stack: one pure rule, decided once, for every front end.

Front ends only say who is asking (a `Caller` with real uid and groups); the manager applies
`authorize` to every changing request, whichever front end it came through.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from personalityd.core.errors import AccessDenied

ROOT_UID = 0
# Caller.front_end: D-Bus callers need one of the D-Bus groups ("personality"), owners of
# spool files one of spool.allowed_groups.
DBUS = "dbus"
SPOOL = "spool"


@dataclass(frozen=True)
class Caller:
    """Who asks: from the bus's credentials (D-Bus) or the request file's owner (spool)."""

    uid: int
    gids: frozenset[int]  # primary and supplementary groups
    description: str  # for logs, e.g. ":1.42 (uid 1000)" or "spool file web.json (uid 0)"
    front_end: str = DBUS  # which allowed groups apply
    origin: str = ""  # the spool file of the request (a crashed trial answers it at start)

    @property
    def is_root(self) -> bool:
        return self.uid == ROOT_UID


def may_change(caller: Caller, allowed_gids: Collection[int]) -> bool:
    """True when `caller` is root or belongs to one of `allowed_gids`."""
    return caller.is_root or any(gid in caller.gids for gid in allowed_gids)


def authorize(
    caller: Caller,
    operation: str,
    allowed_groups: Sequence[str],
    allowed_gids: Collection[int],
) -> None:
    """Raise AccessDenied naming `operation` (e.g. "Attach") unless `caller` may change the
    stack; `allowed_gids` are the ids of the groups named `allowed_groups`."""
    if may_change(caller, allowed_gids):
        return
    groups = " or ".join(repr(g) for g in allowed_groups) or "(none configured)"
    raise AccessDenied(f"{operation} is only allowed for root and members of the group {groups}")
