"""What the request front ends (D-Bus, spool, CLI via D-Bus) may ask of the manager.

The daemon's Manager implements this; the D-Bus service is written against it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from personalityd.core.access import Caller
from personalityd.core.model import Conflict, PersonalityInfo, StackEvent


class ManagerAPI(Protocol):
    # Changing operations: each goes through the single consumer and returns `changed`.
    # They raise core.errors.PersonalityError subclasses (NoSuchPersonality, Incompatible,
    # MountFailed, InvalidName, Timeout, AccessDenied, Busy, InvalidRequest).
    async def attach(
        self, caller: Caller, name: str, *, timeout: float = 0.0, force: bool = False
    ) -> bool: ...

    async def detach(self, caller: Caller, name: str, *, from_unit: bool = False) -> bool: ...

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

    @property
    def present(self) -> tuple[str, ...]: ...

    @property
    def notices(self) -> tuple[str, ...]: ...

    def subscribe(self, callback: Callable[[StackEvent], object]) -> Callable[[], None]:
        """Call `callback` after every change; returns a function that unsubscribes."""
        ...
