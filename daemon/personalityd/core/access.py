"""Who may change the stack: one pure rule shared by every front end (D-Bus, spool)."""

from __future__ import annotations

from collections.abc import Collection

from personalityd.api import Caller

ROOT_UID = 0


def may_change(caller: Caller, allowed_gids: Collection[int]) -> bool:
    """True when `caller` is root or belongs to one of `allowed_gids`."""
    return caller.uid == ROOT_UID or any(gid in caller.gids for gid in allowed_gids)
