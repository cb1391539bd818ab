"""What the request front ends (D-Bus, spool, CLI via D-Bus) may ask of the manager.

The daemon's Manager implements this; the D-Bus service is written against it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from personalityd.core.model import Conflict


@dataclass(frozen=True)
class PersonalityInfo:
    name: str
    state: str  # model.State value
    version: str
    device: str  # device node, or "" when the volume is absent
    mount_point: str  # "<mount_root>/<name>" as seen on the real system, or "" when not mounted
    reason: str = ""  # why pending / incompatible / failed
    description: str = ""


@dataclass(frozen=True)
class StackEvent:
    """Emitted after every change of the live stack, whatever caused it."""

    generation: int
    attached: tuple[str, ...]  # bottom first
    newly_attached: tuple[str, ...]
    detached: tuple[str, ...]
    # False when only the desired list changed (e.g. a personality whose volume is missing
    # was asked for): properties change, but there is no new stack to signal.
    stack_changed: bool = True


@dataclass(frozen=True)
class Caller:
    """Who asks; front ends fill it in from credentials (D-Bus) or file ownership (spool)."""

    uid: int
    gids: frozenset[int]
    description: str  # for logs, e.g. ":1.42 (uid 1000)" or "spool file web.json"


class ManagerAPI(Protocol):
    # Changing operations: each goes through the single consumer and returns `changed`.
    # They raise core.errors.PersonalityError subclasses (NoSuchPersonality, Incompatible,
    # MountFailed, InvalidName, Timeout, AccessDenied, Busy, InvalidRequest).
    async def attach(
        self, caller: Caller, name: str, *, timeout: float = 0.0, force: bool = False
    ) -> bool: ...

    async def detach(self, caller: Caller, name: str) -> bool: ...

    async def switch(
        self, caller: Caller, names: Sequence[str], *, timeout: float = 0.0, force: bool = False
    ) -> bool: ...

    async def refresh(self, caller: Caller) -> None: ...

    # Reading: synchronous, answered from the current snapshot even while a change runs.
    def list_personalities(self) -> list[PersonalityInfo]: ...

    def conflicts(self) -> tuple[Conflict, ...]: ...

    @property
    def attached(self) -> tuple[str, ...]: ...

    @property
    def desired(self) -> tuple[str, ...]: ...

    @property
    def generation(self) -> int: ...

    @property
    def writable_device(self) -> str: ...

    def subscribe(self, callback: Callable[[StackEvent], object]) -> Callable[[], None]:
        """Call `callback` after every change; returns a function that unsubscribes."""
        ...
