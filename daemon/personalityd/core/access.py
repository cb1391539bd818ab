"""Who may change the stack: one pure rule shared by every front end (D-Bus, spool)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

ROOT_UID = 0


@dataclass(frozen=True)
class Caller:
    """Who asks; front ends fill it in from credentials (D-Bus) or file ownership (spool)."""

    uid: int
    gids: frozenset[int]
    description: str  # for logs, e.g. ":1.42 (uid 1000)" or "spool file web.json"


def may_change(caller: Caller, allowed_gids: Collection[int]) -> bool:
    """True when `caller` is root or belongs to one of `allowed_gids`."""
    return caller.uid == ROOT_UID or any(gid in caller.gids for gid in allowed_gids)
