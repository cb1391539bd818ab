"""What the request front ends (D-Bus, spool, CLI via D-Bus) may ask of the manager.

The daemon's Manager implements this; the D-Bus service is written against it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from personalityd.core.access import Caller
from personalityd.core.history import Generation, TrialOptions
from personalityd.core.model import Conflict, PersonalityInfo, StackEvent


class ManagerAPI(Protocol):
    # Changing operations: each goes through the single consumer and returns `changed`.
    # They raise core.errors.PersonalityError subclasses (NoSuchPersonality, Incompatible,
    # MountFailed, InvalidName, Timeout, AccessDenied, Busy, InvalidRequest).
    # `trial`: None for the configured default (transactions.confirm_timeout); with a trial
    # the answer waits for its end and is RolledBack when it is rolled back.
    async def attach(
        self,
        caller: Caller,
        name: str,
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool: ...

    async def detach(
        self,
        caller: Caller,
        name: str,
        *,
        from_unit: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool: ...

    async def switch(
        self,
        caller: Caller,
        names: Sequence[str],
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool: ...

    async def refresh(self, caller: Caller) -> None: ...

    async def rollback(
        self,
        caller: Caller,
        generation: int,
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
        data: bool = False,
    ) -> int:
        """The generation current afterwards. InvalidRequest for an unknown generation,
        NotSupported for `data` without a btrfs writable volume."""
        ...

    async def confirm(self, caller: Caller, generation: int) -> None: ...

    def list_generations(self) -> tuple[Generation, ...]: ...

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
