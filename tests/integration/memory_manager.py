"""An in-memory ManagerAPI for testing the D-Bus layer and personalityctl without mounts.

It keeps the semantics the front ends rely on (docs/dbus.md): a desired list, a live
stack (the desired personalities that are present and compatible, or forced), a generation
that goes up by one per live-stack change, StackEvents to subscribers, the domain errors, and
the daemon's one authorization rule (core/access.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from personalityd.adapters.groups import DEFAULT_GROUPS
from personalityd.core import history
from personalityd.core.access import Caller, authorize
from personalityd.core.errors import Incompatible, NoSuchPersonality, Timeout
from personalityd.core.history import Generation, TrialOptions
from personalityd.core.model import Conflict, DesiredEntry, PersonalityInfo, StackEvent
from personalityd.core.names import check_name

MOUNT_ROOT = "/opt/personality"

# Attaching this name raises an unexpected exception with secret-looking text in it.
EXPLODING_NAME = "explode"
SECRET_TEXT = "secret-detail-/etc/shadow"


@dataclass
class FakeVolume:
    name: str
    version: str = "1.0"
    device: str = ""
    incompatibility: str = ""
    description: str = ""


class MemoryManager:
    def __init__(
        self,
        volumes: Sequence[FakeVolume] = (),
        *,
        allowed_gids: Collection[int] = (),
        writable_device: str = "/dev/vdb",
    ) -> None:
        self.volumes: dict[str, FakeVolume] = {}
        self._desired: list[str] = []
        self._forced: set[str] = set()
        self._generation = 0
        self._attached: tuple[str, ...] = ()
        self._subscribers: list[Callable[[StackEvent], object]] = []
        self._arrived = asyncio.Event()
        self.allowed_gids = frozenset(allowed_gids)
        self._writable_device = writable_device
        self.conflict_list: tuple[Conflict, ...] = ()
        self.callers: list[tuple[str, Caller]] = []  # (operation, caller) as received
        self.trials: list[TrialOptions | None] = []  # the trial options of changing calls
        self.history: tuple[Generation, ...] = (
            Generation(0, (), time.time_ns() // 1000, history.CONFIRMED, history.CAUSE_START),
        )
        self._cause = history.CAUSE_DBUS
        for volume in volumes:
            self.add_volume(volume)

    # -- test controls ----------------------------------------------------------------------

    def add_volume(self, volume: FakeVolume) -> None:
        """A volume appears (as a udev event would report it)."""
        if not volume.device:
            volume.device = f"/dev/loop{len(self.volumes) + 10}"
        self.volumes[volume.name] = volume
        self._arrived.set()
        self._arrived = asyncio.Event()
        self._rebuild()

    def remove_volume(self, name: str) -> None:
        del self.volumes[name]
        self._rebuild()

    def set_conflicts(self, conflicts: Sequence[Conflict]) -> None:
        self.conflict_list = tuple(conflicts)

    async def wait_for_callers(self, count: int, timeout: float = 120) -> None:
        """Until `count` changing calls have reached the manager (one that waits for its
        volume waits in here): an event to wait for instead of a pause."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.callers) < count:
            assert loop.time() < deadline, f"calls that reached the manager: {self.callers}"
            await asyncio.sleep(0.01)

    # -- ManagerAPI: changing ---------------------------------------------------------------

    async def attach(
        self,
        caller: Caller,
        name: str,
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        self.trials.append(trial)
        self._authorize("attach", caller)
        check_name(name)
        if name == EXPLODING_NAME:
            raise RuntimeError(f"unexpected failure reading {SECRET_TEXT}")
        await self._wait_for([name], timeout)
        self._check_compatible([name], force)
        if name in self._desired:
            return False
        self._desired.append(name)
        if force:
            self._forced.add(name)
        self._rebuild()
        return True

    async def detach(
        self,
        caller: Caller,
        name: str,
        *,
        from_unit: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        self.trials.append(trial)
        self._authorize("detach", caller)
        check_name(name)
        if name not in self._desired:
            if name not in self.volumes:
                raise NoSuchPersonality(f"no personality named {name!r}")
            return False
        self._desired.remove(name)
        self._forced.discard(name)
        self._rebuild()
        return True

    async def switch(
        self,
        caller: Caller,
        names: Sequence[str],
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        self.trials.append(trial)
        self._authorize("switch", caller)
        for name in names:
            check_name(name)
        await self._wait_for(names, timeout)
        self._check_compatible(names, force)
        if list(names) == self._desired:
            return False
        self._desired = list(names)
        self._forced = set(names) if force else set()
        self._rebuild()
        return True

    async def refresh(self, caller: Caller) -> None:
        self._authorize("refresh", caller)
        self._rebuild()

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
        """No trials and no data here: the desired list of the generation, as a switch."""
        self.trials.append(trial)
        self._authorize("rollback", caller)
        target = history.rollback_target(self.history, self._generation, generation)
        self._desired = list(target.names)
        self._cause = history.CAUSE_ROLLBACK
        try:
            self._rebuild()
        finally:
            self._cause = history.CAUSE_DBUS
        return self._generation

    async def confirm(self, caller: Caller, generation: int) -> None:
        self._authorize("confirm", caller)
        history.confirm_target(None, generation)

    def list_generations(self) -> tuple[Generation, ...]:
        return self.history

    # -- ManagerAPI: reading ----------------------------------------------------------------

    def list_personalities(self) -> list[PersonalityInfo]:
        infos = []
        for name in sorted(set(self.volumes) | set(self._desired)):
            volume = self.volumes.get(name)
            if volume is None:
                infos.append(PersonalityInfo(name, "pending", "", "", "", "volume not present"))
                continue
            if name in self._attached:
                state, reason = "attached", ""
            elif volume.incompatibility:
                state, reason = "incompatible", volume.incompatibility
            else:
                state, reason = "available", ""
            mount_point = f"{MOUNT_ROOT}/{name}" if state == "attached" else ""
            infos.append(
                PersonalityInfo(
                    name,
                    state,
                    volume.version,
                    volume.device,
                    mount_point,
                    reason,
                    volume.description,
                )
            )
        return infos

    def conflicts(self) -> tuple[Conflict, ...]:
        return self.conflict_list

    @property
    def attached(self) -> tuple[str, ...]:
        return self._attached

    @property
    def desired(self) -> tuple[str, ...]:
        return tuple(self._desired)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def writable_device(self) -> str:
        return self._writable_device

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(sorted(self.volumes))

    @property
    def notices(self) -> tuple[str, ...]:
        return ()

    def subscribe(self, callback: Callable[[StackEvent], object]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    # -- internals --------------------------------------------------------------------------

    def _authorize(self, operation: str, caller: Caller) -> None:
        self.callers.append((operation, caller))
        authorize(caller, operation.capitalize(), DEFAULT_GROUPS, self.allowed_gids)

    async def _wait_for(self, names: Sequence[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := [n for n in names if n not in self.volumes]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if timeout > 0:
                    raise Timeout(f"volume of {missing[0]!r} did not appear within {timeout:g}s")
                raise NoSuchPersonality(f"no personality named {missing[0]!r}")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                continue

    def _check_compatible(self, names: Sequence[str], force: bool) -> None:
        for name in names:
            reason = self.volumes[name].incompatibility
            if reason and not force:
                raise Incompatible(f"{name!r} is incompatible with the base: {reason}")

    def _rebuild(self) -> None:
        live = tuple(
            n
            for n in self._desired
            if n in self.volumes and (not self.volumes[n].incompatibility or n in self._forced)
        )
        if live == self._attached:
            return
        old = self._attached
        self._attached = live
        self._generation += 1
        desired = tuple(DesiredEntry(n) for n in self._desired)
        now = time.time_ns() // 1000
        entry = Generation(self._generation, desired, now, history.CONFIRMED, self._cause)
        self.history = history.record(self.history, entry, 16)
        event = StackEvent(
            generation=self._generation,
            attached=live,
            newly_attached=tuple(n for n in live if n not in old),
            detached=tuple(n for n in old if n not in live),
        )
        for callback in self._subscribers:
            callback(event)
