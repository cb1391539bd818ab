"""The personality manager: one consumer applies every change of the stack, in order.

Front ends (D-Bus, spool) and udev only enqueue jobs and await their outcome. Requests that
arrive while a change runs are taken together: their desired-list edits are applied in
arrival order and one rebuild serves them all; if that rebuild fails, they are retried one by
one so that each gets its own, exact answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog

from personalityd.adapters.journal import Journal
from personalityd.adapters.state import PersistedState, save_state, write_conflict_report
from personalityd.adapters.systemd import ServiceHooks
from personalityd.adapters.udev import DeviceEvent, enumerate_block_devices
from personalityd.config import Config
from personalityd.core.access import Caller, may_change
from personalityd.core.errors import (
    AccessDenied,
    Busy,
    Incompatible,
    InvalidRequest,
    MountFailed,
    NoSuchPersonality,
    PersonalityError,
)
from personalityd.core.model import (
    Conflict,
    ConflictReport,
    DesiredEntry,
    PersonalityInfo,
    StackEvent,
    StackPlan,
    Volume,
)
from personalityd.core.names import check_name
from personalityd.core.planner import personality_state, plan_stack
from personalityd.stack.engine import Engine, Upper
from personalityd.stack.registry import VolumeRegistry

log = structlog.get_logger()

MAX_BATCH = 64


@dataclass
class Job:
    action: str  # attach, detach, switch, refresh, device
    names: tuple[str, ...] = ()
    force: bool = False
    event: DeviceEvent | None = None
    future: asyncio.Future[bool] | None = None
    changed: bool = False


@dataclass
class Snapshot:
    """What readers see; replaced as a whole after each change."""

    generation: int = 0
    live: tuple[str, ...] = ()
    report: ConflictReport = field(default_factory=lambda: ConflictReport((), 0))


class Manager:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        registry: VolumeRegistry,
        journal: Journal,
        state: PersistedState,
        allowed_gids: Callable[[], frozenset[int]],
        hooks: ServiceHooks | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.registry = registry
        self.journal = journal
        self.allowed_gids = allowed_gids
        self.hooks = hooks or ServiceHooks()
        self.desired_entries: tuple[DesiredEntry, ...] = state.desired
        self._saved = state
        self.snapshot = Snapshot(generation=state.generation)
        self.upper = Upper("none", None, "")
        self.draining: dict[str, str] = {}  # name -> device node still held by the kernel
        self.rebuilds = 0
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._changing = False  # a batch is being applied
        self._callers = 0  # front-end calls inside attach/detach/switch/refresh
        self._subscribers: list[Callable[[StackEvent], object]] = []

    # -- ManagerAPI: reading ---------------------------------------------------------------

    @property
    def attached(self) -> tuple[str, ...]:
        return self.snapshot.live

    @property
    def desired(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.desired_entries)

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    @property
    def writable_device(self) -> str:
        return self.upper.device

    def conflicts(self) -> tuple[Conflict, ...]:
        return self.snapshot.report.conflicts

    def subscribe(self, callback: Callable[[StackEvent], object]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def list_personalities(self) -> list[PersonalityInfo]:
        volumes = self.registry.volumes
        states = personality_state(
            desired=self.desired_entries,
            volumes=volumes,
            live=self.snapshot.live,
            draining=tuple(self.draining),
            failed=self.registry.failed,
        )
        infos = []
        for name in sorted(states):
            state, reason = states[name]
            volume = volumes.get(name)
            mounted = self.engine.volumes.get(name)
            infos.append(
                PersonalityInfo(
                    name=name,
                    state=str(state),
                    version=volume.manifest.version if volume else "",
                    device=volume.device.devnode if volume else self.draining.get(name, ""),
                    mount_point=mounted.path if mounted else "",
                    reason=reason or "",
                    description=volume.manifest.description if volume else "",
                )
            )
        return infos

    # -- ManagerAPI: changing --------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Counts a front-end call while it is inside the manager (see stop())."""
        self._callers += 1
        try:
            yield
        finally:
            self._callers -= 1

    def _check_running(self) -> None:
        if self._stopping.is_set():
            raise Busy("personalityd is stopping; ask again once it is back")

    async def _wait_for_volumes(self, names: Sequence[str], timeout: float) -> None:
        """registry.wait_for, cut short with Busy when the daemon starts stopping.

        Nothing to wait for: no suspension at all, so requests reach the queue in the order
        they were made (the spool relies on it)."""
        if timeout <= 0 or all(n in self.registry.volumes for n in names):
            await self.registry.wait_for(names, timeout)
            return
        waiting = asyncio.ensure_future(self.registry.wait_for(names, timeout))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not waiting.done():
            waiting.cancel()
            self._check_running()
        waiting.result()

    def _authorize(self, caller: Caller) -> None:
        self._check_running()
        if not may_change(caller, self.allowed_gids()):
            raise AccessDenied(
                f"{caller.description} may not change the stack: "
                "only root and members of the 'personality' group may"
            )

    async def attach(
        self, caller: Caller, name: str, *, timeout: float = 0.0, force: bool = False
    ) -> bool:
        with self._call():
            self._authorize(caller)
            check_name(name)
            await self._wait_for_volumes([name], timeout)
            return await self._submit(Job("attach", (name,), force))

    async def detach(self, caller: Caller, name: str) -> bool:
        with self._call():
            self._authorize(caller)
            check_name(name)
            return await self._submit(Job("detach", (name,)))

    async def switch(
        self, caller: Caller, names: Sequence[str], *, timeout: float = 0.0, force: bool = False
    ) -> bool:
        with self._call():
            self._authorize(caller)
            for name in names:
                check_name(name)
            if len(set(names)) != len(names):
                raise InvalidRequest("a personality is named more than once in the switch")
            await self._wait_for_volumes(list(names), timeout)
            return await self._submit(Job("switch", tuple(names), force))

    async def refresh(self, caller: Caller) -> None:
        with self._call():
            self._authorize(caller)
            await self._submit(Job("refresh"))

    def device_event(self, event: DeviceEvent) -> None:
        self._queue.put_nowait(Job("device", event=event))

    async def stop(self, timeout: float = 30.0) -> None:
        """Take no more changes, answer queued requests with Busy, and wait (bounded) for the
        running change and for callers to return: a clean stop never cuts a change in half."""
        self._stopping.set()
        while not self._queue.empty():
            _fail(self._queue.get_nowait(), Busy("personalityd is stopping; ask again later"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._changing or self._callers) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def _submit(self, job: Job) -> bool:
        job.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(job)
        return await job.future

    # -- the consumer ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._changing = True
            try:
                await self._process(batch)
            except Exception as exc:  # one bad change must not stop the manager
                log.exception("change_crashed")
                for job in batch:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(MountFailed(f"internal error: {exc!r}"))
            finally:
                self._changing = False

    async def _process(self, batch: list[Job]) -> None:
        for job in batch:
            if job.action == "device":
                assert job.event is not None
                await self._apply_device_event(job.event)
            elif job.action == "refresh":
                # An operator refreshes after fixing a medium: volumes that failed get retried.
                self.registry.failed.clear()
                await self.rescan()
        requests = [j for j in batch if j.action not in ("device", "refresh")]
        original = self.desired_entries
        accepted = [job for job in requests if self._edit_desired(job)]
        description = "; ".join(_describe(j) for j in accepted) or "device change"
        requested = frozenset(n for j in accepted for n in j.names)
        try:
            await self.rebuild(description, requested)
        except PersonalityError as error:
            self.desired_entries = original
            await self._converge()
            if len(accepted) > 1:
                for job in accepted:
                    await self._process([Job(job.action, job.names, job.force, future=job.future)])
                accepted = []
            else:
                for job in accepted:
                    _fail(job, error)
                accepted = []
                if not requests:
                    log.error("device_change_failed", error=str(error))
        for job in accepted:
            if job.future is not None and not job.future.done():
                job.future.set_result(job.changed)
        for job in batch:
            if job.action == "refresh" and job.future is not None and not job.future.done():
                job.future.set_result(True)

    def _edit_desired(self, job: Job) -> bool:
        """Apply one request to the desired list; False (and the job answered) if refused."""
        volumes = self.registry.volumes
        current = list(self.desired_entries)
        names_now = [e.name for e in current]
        try:
            if job.action in ("attach", "switch"):
                for name in job.names:
                    volume = volumes.get(name)
                    if volume is None:
                        raise NoSuchPersonality(self.registry.no_such_message([name]))
                    if name in self.registry.failed:
                        raise MountFailed(
                            f"volume '{name}' failed earlier: {self.registry.failed[name]}"
                        )
                    if not volume.compatible and not job.force:
                        already = any(e.name == name and e.force for e in current)
                        if not already:
                            raise Incompatible(
                                f"'{name}' is incompatible with the base: {volume.incompatibility}"
                            )
            if job.action == "attach":
                name = job.names[0]
                if name in names_now:
                    job.changed = False
                    return True
                current.append(DesiredEntry(name, job.force))
                job.changed = True
            elif job.action == "detach":
                name = job.names[0]
                if name not in names_now and name not in volumes:
                    # Nothing to detach and no such volume: most likely a typo; say so.
                    raise NoSuchPersonality(self.registry.no_such_message([name]))
                job.changed = name in names_now
                current = [e for e in current if e.name != name]
            elif job.action == "switch":
                forced = {e.name for e in current if e.force}
                current = [DesiredEntry(n, job.force or n in forced) for n in job.names]
                job.changed = [e.name for e in current] != names_now
        except PersonalityError as error:
            _fail(job, error)
            return False
        self.desired_entries = tuple(current)
        return True

    async def _apply_device_event(self, event: DeviceEvent) -> bool:
        if event.action == "rescan":
            return await self.rescan()
        if event.action == "remove":
            identity = self._identity_of(event.device.devnode)
            changed = self.registry.device_gone(event.device.devnode)
            if identity:
                self.engine.forget_index(identity)
            return changed
        return await self.registry.device_present(event.device)

    def _identity_of(self, devnode: str) -> str | None:
        for volume in self.registry.volumes.values():
            if volume.device.devnode == devnode:
                return volume.device.identity
        return None

    async def rescan(self) -> bool:
        loop = asyncio.get_running_loop()
        devices = await loop.run_in_executor(None, lambda: list(enumerate_block_devices()))
        changed = self.registry.forget_missing(devices)
        for device in devices:
            changed = await self.registry.device_present(device) or changed
        return changed

    # -- rebuilding the stack --------------------------------------------------------------

    def _current_upper(self) -> Upper:
        writable = self.registry.writable
        if writable is not None:
            try:
                return self.engine.writable_upper(writable)
            except OSError as exc:
                log.error("writable_mount_failed", device=writable.devnode, error=str(exc))
        if self.config.writable_fallback == "tmpfs":
            return self.engine.tmpfs_upper()
        return Upper("none", None, "")

    async def rebuild(self, requested: str, names: frozenset[str] = frozenset()) -> bool:
        """Make the mounted stack match the desired list and the present volumes.

        Returns True when the live stack changed. Raises PersonalityError (with nothing
        visible changed) when the new stack cannot be built."""
        while True:
            try:
                return await self._rebuild_once(requested, names)
            except _VolumeFailed as failure:
                self.registry.mark_failed(failure.name, str(failure.error))
                if failure.requested:
                    self.journal.change_failed(requested, str(failure.error))
                    raise failure.error from None
                # A volume that came back broken: stack the rest without it.

    async def _rebuild_once(self, requested: str, names: frozenset[str]) -> bool:
        volumes = self.registry.usable()
        hierarchies = tuple(self.config.hierarchies)
        live = plan_stack(self.desired_entries, volumes, lambda n, h: True, hierarchies).live
        live_volumes = [volumes[n] for n in live]
        try:
            made = await self.engine.mount_and_index(live_volumes)
        except MountFailed as error:
            name = _failed_name(error, live_volumes)
            raise _VolumeFailed(name, error, name in names) from None
        upper = self._current_upper()
        plan = plan_stack(self.desired_entries, volumes, self._provides(volumes), hierarchies)
        snapshot = self.snapshot
        if plan.live == snapshot.live and self.engine.is_current(plan, upper):
            desired_before = tuple(e.name for e in self._saved.desired)
            self._persist(snapshot.generation)
            self.upper = upper
            if desired_before != self.desired:
                live = snapshot.live
                self._notify(StackEvent(snapshot.generation, live, (), (), stack_changed=False))
            return False
        generation = snapshot.generation + 1
        try:
            self._check_layer_limit(plan)
            loop = asyncio.get_running_loop()
            report = await loop.run_in_executor(None, self.engine.conflict_report, plan, volumes)
            wanted = self.engine.specs_for(plan, upper)
            # Blocking work (mounts, fsync) runs in a worker thread, so D-Bus readers are
            # answered meanwhile; only the consumer changes the engine, so this is race-free.
            built = await loop.run_in_executor(None, self.engine.build, wanted, generation)
            try:
                await loop.run_in_executor(None, self._persist, generation)
            except OSError as exc:
                self.engine.release(built)
                raise MountFailed(f"cannot save the state: {exc}") from exc
        except PersonalityError as error:
            for mounted in made:
                self.engine.unmount_volume(mounted.name)
            self.journal.change_failed(requested, str(error))
            log.error("change_failed", requested=requested, error=str(error))
            raise
        leaving = [v for n, v in self.registry.volumes.items() if n in snapshot.live]
        leaving = [v for v in leaving if v.name not in plan.live]
        if self.hooks.before_swap is not None and leaving:
            await _maybe_await(self.hooks.before_swap(leaving))
        started = time.monotonic()
        try:
            self.engine.swap(wanted, built)
        except OSError as exc:
            # Rare (the kernel refused a move): hierarchies already swapped stay swapped; the
            # caller restores the desired list and converges back to it.
            self.engine.release(built)
            failure = MountFailed(f"swapping in the new stack failed: {exc}")
            self.journal.change_failed(requested, str(failure))
            log.error("swap_failed", requested=requested, error=str(exc))
            raise failure from exc
        swap_ms = (time.monotonic() - started) * 1000
        self.rebuilds += 1
        for name in list(self.engine.volumes):
            if name not in plan.live:
                gone = self.engine.unmount_volume(name)
                if gone is not None:
                    self.draining[name] = gone.devnode
        for name in plan.live:
            self.draining.pop(name, None)
        await loop.run_in_executor(None, self._record, generation, plan, report)
        self.upper = upper
        self._publish(generation, plan, report, snapshot.live, swap_ms)
        self.engine.clean_work_dirs(upper, generation)
        self.engine.release_writable(upper)
        arriving = [volumes[n] for n in plan.live if n not in snapshot.live]
        if self.hooks.after_change is not None:  # reloads even when only leaving
            await _maybe_await(self.hooks.after_change(arriving))
        return True

    async def _converge(self) -> None:
        """After a failed change: make sure what is mounted matches the restored desired list
        (a no-op unless the failure came after something visible had changed)."""
        try:
            await self.rebuild("return to the desired list after a failed change")
        except PersonalityError as error:
            log.error("converge_failed", error=str(error))

    def _provides(self, volumes: dict[str, Volume]) -> Callable[[str, str], bool]:
        def provided(name: str, hierarchy: str) -> bool:
            index = self.engine.indexes.get(volumes[name].device.identity)
            return index is not None and hierarchy in index

        return provided

    def _check_layer_limit(self, plan: StackPlan) -> None:
        limit = self.config.max_layers
        for h, names in plan.layers.items():
            if len(names) + 1 > limit:
                raise MountFailed(
                    f"{h} would have {len(names) + 1} layers ({len(names)} personalities "
                    f"and the base); overlayfs allows at most {limit}"
                )

    def _persist(self, generation: int) -> None:
        state = PersistedState(self.desired_entries, generation)
        if state != self._saved:
            save_state(self.config.path(self.config.state_dir), state)
            self._saved = state

    def _record(self, generation: int, plan: StackPlan, report: ConflictReport) -> None:
        """The files and journal entries of a change (in a worker thread, before _publish)."""
        self.engine.write_record(generation)
        runtime = self.config.path(self.config.runtime_dir)
        try:
            write_conflict_report(runtime, generation, plan.live, report)
        except OSError as exc:
            log.error("conflict_report_not_written", error=str(exc))
        self.journal.report_stack(generation, plan.live, report.conflicts, report.overrides)

    def _publish(
        self,
        generation: int,
        plan: StackPlan,
        report: ConflictReport,
        before: tuple[str, ...],
        swap_ms: float,
    ) -> None:
        self.snapshot = Snapshot(generation, plan.live, report)
        if self.upper.kind == "tmpfs":
            log.warning("writable_volatile", reason="no writable volume; writes go to a tmpfs")
        log.info(
            "stack_changed",
            generation=generation,
            attached=" ".join(plan.live),
            conflicts=len(report.conflicts),
            overrides=report.overrides,
            swap_ms=round(swap_ms, 3),
        )
        event = StackEvent(
            generation=generation,
            attached=plan.live,
            newly_attached=tuple(n for n in plan.live if n not in before),
            detached=tuple(n for n in before if n not in plan.live),
        )
        self._notify(event)

    def _notify(self, event: StackEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("subscriber_failed")

    # -- start-up and draining -------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what an earlier run left and converge to the desired list (before READY)."""
        await self.rescan()
        self.engine.adopt(self.registry.volumes)
        volumes = self.registry.usable()
        # Adoption keeps the generation when the mounted stack already is the desired one.
        live = plan_stack(
            self.desired_entries, volumes, lambda n, h: True, tuple(self.config.hierarchies)
        ).live
        try:
            await self.engine.mount_and_index([volumes[n] for n in live])
        except MountFailed as error:
            log.error("adopt_index_failed", error=str(error))
        upper = self._current_upper()
        plan = plan_stack(
            self.desired_entries, volumes, self._provides(volumes), tuple(self.config.hierarchies)
        )
        if self.engine.is_current(plan, upper):
            loop = asyncio.get_running_loop()
            report = await loop.run_in_executor(None, self.engine.conflict_report, plan, volumes)
            self.upper = upper
            self.snapshot = Snapshot(self.snapshot.generation, plan.live, report)
            write_conflict_report(
                self.config.path(self.config.runtime_dir), self.generation, plan.live, report
            )
            log.info("stack_restored", generation=self.generation, attached=" ".join(plan.live))
        else:
            try:
                await self.rebuild("restore desired list at start")
            except PersonalityError as error:
                log.error("restore_failed", error=str(error))
        self.engine.clean_work_dirs(self.upper, self.generation)

    async def watch_draining(self, interval: float = 0.5) -> None:
        """Report a volume as draining until the kernel releases its device."""
        while True:
            await asyncio.sleep(interval)
            for name, devnode in list(self.draining.items()):
                if not _device_busy(devnode):
                    del self.draining[name]
                    log.info("volume_released", name=name, device=devnode)


class _VolumeFailed(Exception):
    def __init__(self, name: str, error: PersonalityError, requested: bool) -> None:
        super().__init__(str(error))
        self.name = name
        self.error = error
        self.requested = requested


def _failed_name(error: MountFailed, volumes: Sequence[Volume]) -> str:
    for volume in volumes:
        if f"'{volume.name}'" in str(error):
            return volume.name
    return volumes[-1].name if volumes else ""


def _device_busy(devnode: str) -> bool:
    """A block device still used by a (lazily unmounted) filesystem refuses O_EXCL."""
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == 16  # EBUSY
    os.close(fd)
    return False


def _fail(job: Job, error: PersonalityError) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(error)


def _describe(job: Job) -> str:
    return f"{job.action} {' '.join(job.names)}".strip()


async def _maybe_await(result: object) -> None:
    if asyncio.iscoroutine(result):
        await result
