"""The personality manager: the queue, batching and retries around stack changes.

Front ends (D-Bus, spool) and udev only enqueue jobs and await their outcome; one consumer
takes them in order. Requests that arrive while a change runs are taken together: their
desired-list edits (core/desired.py) are applied in arrival order and one change
(stack/transaction.py) serves them all; if that change fails, they are retried one by one so
that each gets its own, exact answer. Every changing request is authorized here, once, with
the rule of core/access.py, whatever front end it came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters.groups import DEFAULT_GROUPS, lookup_group_gids
from personalityd.adapters.journal import Journal
from personalityd.adapters.mounts import device_busy
from personalityd.adapters.state import PersistedState, save_state
from personalityd.adapters.systemd import ServiceManager
from personalityd.adapters.udev import DeviceEvent, enumerate_block_devices
from personalityd.config import Config
from personalityd.core import history
from personalityd.core.access import SPOOL, Caller, authorize
from personalityd.core.desired import Edit, check_edit, edit_desired
from personalityd.core.errors import (
    Busy,
    Incompatible,
    InternalError,
    InvalidRequest,
    MountFailed,
    NotSupported,
    PersonalityError,
    RolledBack,
    Stopping,
)
from personalityd.core.history import (
    CAUSE_ROLLBACK,
    CAUSE_START,
    DEVICE_CHANGE,
    Generation,
    Intent,
    TrialOptions,
    TrialRecord,
)
from personalityd.core.model import Conflict, PersonalityInfo, StackEvent
from personalityd.core.planner import personality_state
from personalityd.log import CallerLog
from personalityd.stack.engine import Engine
from personalityd.stack.follower import Follower, base_tools
from personalityd.stack.indexes import VolumeIndexes
from personalityd.stack.registry import VolumeRegistry
from personalityd.stack.transaction import (
    Answer,
    Change,
    Snapshot,
    Stack,
    StackState,
    VolumeFailed,
    adopt,
)
from personalityd.stack.trial import (
    BY_REQUEST,
    Aborted,
    ActiveTrial,
    Confirmed,
    Failed,
    Outcome,
    Requested,
    judge,
)

log = structlog.get_logger()
refusals = CallerLog(__name__)

MAX_BATCH = 64


INTERRUPTED = "not confirmed before the daemon stopped"


@dataclass
class Job:
    kind: str  # "request", "refresh", "device"
    edit: Edit | None = None
    event: DeviceEvent | None = None
    future: asyncio.Future[bool] | None = None
    changed: bool = False
    intent: Intent = DEVICE_CHANGE
    made: int = 0  # the generation current once the job's change was made
    target: int = 0  # a Rollback's: the generation whose desired list it applies


def _cause(caller: Caller) -> str:
    return history.CAUSE_SPOOL if caller.front_end == SPOOL else history.CAUSE_DBUS


class Manager:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        registry: VolumeRegistry,
        journal: Journal,
        state: PersistedState,
        services: ServiceManager | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.registry = registry
        self.state = StackState(state.desired, state, Snapshot(generation=state.generation))
        self.indexes = VolumeIndexes(engine.layout, config.hierarchies)
        tools = base_tools(config, engine.layout)
        live = lambda: self.state.snapshot.live  # noqa: E731
        self.follower = Follower(str(config.root), journal, tools, services, live)
        self.stack = Stack(
            config, engine, self.indexes, registry, journal, self.follower,
            self.state, self._notify,
        )  # fmt: skip
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._changing = False  # a batch is being applied
        self._callers = 0  # front-end calls inside attach/detach/switch/refresh
        self._subscribers: list[Callable[[StackEvent], object]] = []
        self._notices: tuple[str, ...] = ()
        self._listing: tuple[tuple[object, ...], list[PersonalityInfo]] | None = None
        self._active: ActiveTrial | None = None  # the trial under way (stack/trial.py)
        # Spool files whose trial a crash interrupted, answered with its rollback at start.
        self._interrupted: dict[str, RolledBack] = {}
        if history.find(state.history, state.generation) is None:
            # A state from before the history (or a fresh one): the current generation is
            # where a first trial returns to.
            now = Generation(state.generation, state.desired, _now_usec(), history.CONFIRMED,
                             CAUSE_START)  # fmt: skip
            saved = dataclasses.replace(
                state, history=history.record(state.history, now, config.history)
            )
            self.state.saved = saved

    # -- ManagerAPI: reading ---------------------------------------------------------------

    @property
    def attached(self) -> tuple[str, ...]:
        return self.state.snapshot.live

    @property
    def desired(self) -> tuple[str, ...]:
        return self.state.desired_names()

    @property
    def generation(self) -> int:
        return self.state.snapshot.generation

    @property
    def writable_device(self) -> str:
        return self.state.upper.device

    @property
    def present(self) -> tuple[str, ...]:
        """The names ListPersonalities lists (whatever their state), sorted."""
        return tuple(info.name for info in self.list_personalities())

    @property
    def notices(self) -> tuple[str, ...]:
        """What an operator should know about this host (e.g. a systemd-sysext merge)."""
        return self._notices

    def add_notice(self, notice: str) -> None:
        self._notices = (*self._notices, notice)

    def conflicts(self) -> tuple[Conflict, ...]:
        return self.state.snapshot.report.conflicts

    def list_generations(self) -> tuple[Generation, ...]:
        """The history, oldest first (core/history.py)."""
        return self.state.saved.history

    @property
    def trial(self) -> TrialRecord | None:
        return self.state.saved.trial

    def subscribe(self, callback: Callable[[StackEvent], object]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def list_personalities(self) -> list[PersonalityInfo]:
        """Every known personality, by name; made again only when what it shows changed (with
        a thousand image files, readers ask far more often than anything changes)."""
        key = self._listing_key()
        if self._listing is not None and _same_listing_key(self._listing[0], key):
            return list(self._listing[1])
        infos = self._list_personalities()
        self._listing = (key, infos)
        return list(infos)

    def _listing_key(self) -> tuple[object, ...]:
        """What the listing is made of: the volumes dict itself (replaced, never changed in
        place), the snapshot (replaced at each change), and copies of the small rest."""
        state = self.state
        return (
            self.registry.volumes,
            state.snapshot,
            state.desired,
            tuple(state.draining.items()),
            tuple(self.registry.failed.items()),
            tuple((n, m.path) for n, m in self.engine.volumes.items()),
        )

    def _list_personalities(self) -> list[PersonalityInfo]:
        volumes = self.registry.volumes
        draining = self.state.draining
        states = personality_state(
            desired=self.state.desired,
            volumes=volumes,
            live=self.state.snapshot.live,
            draining=tuple(draining),
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
                    device=volume.device.devnode if volume else draining.get(name, ""),
                    mount_point=mounted.path if mounted else "",
                    reason=reason or "",
                    description=volume.manifest.description if volume else "",
                )
            )
        return infos

    # -- ManagerAPI: changing --------------------------------------------------------------

    async def attach(
        self,
        caller: Caller,
        name: str,
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        return await self._request(caller, Edit("attach", (name,), force), timeout, trial)

    async def detach(
        self,
        caller: Caller,
        name: str,
        *,
        from_unit: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        """`from_unit`: the ExecStop of personality@NAME.service; it changes nothing when the
        daemon itself stops that unit or the system shuts down (stack/follower.py), and is
        then answered at once, never queued behind the change that stops the unit."""
        if from_unit:
            with self._call():
                await self._authorize(caller, "Detach")
                if await self.follower.unit_stop_is_ours(name):
                    log.info("unit_stop_detach_skipped", name=name, caller=caller.description)
                    return False
        return await self._request(caller, Edit("detach", (name,)), 0.0, trial)

    async def switch(
        self,
        caller: Caller,
        names: Sequence[str],
        *,
        timeout: float = 0.0,
        force: bool = False,
        trial: TrialOptions | None = None,
    ) -> bool:
        return await self._request(caller, Edit("switch", tuple(names), force), timeout, trial)

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
        """Apply generation `generation`'s desired list (0: the newest confirmed one before
        the current) as a new change; the generation current afterwards. During a trial it
        ends the trial (whose callers get RolledBack) and returns to `generation`."""
        with self._call():
            await self._authorize(caller, "Rollback")
            target = history.rollback_target(
                self.state.saved.history, self.generation, generation
            )
            if data:
                await self._check_data(target.number)
            names = target.names
            forced = tuple(e.name for e in target.desired if e.force)
            edit = Edit("switch", names, force, forced=forced)
            options = self._trial_options(trial)
            intent = Intent(
                CAUSE_ROLLBACK,
                options,
                ends_trial=None,
                data_from=target.number if data else None,
            )
            job = Job("request", edit, intent=intent, target=target.number)
            log.info("rollback_requested", generation=target.number, caller=caller.description)
            active = self._active
            if active is not None:
                job.future = asyncio.get_running_loop().create_future()
                if active.request_rollback(job):
                    await job.future
                    return job.made
            await self._wait_for_volumes(names, timeout)
            await self._submit(job)
            return job.made

    async def _check_data(self, generation: int) -> None:
        data = self.stack.upper_data
        if data is None:
            raise NotSupported(
                "data rollback needs a btrfs writable volume; the upper here is "
                f"{self.stack.upper_description()}"
            )
        if not await asyncio.get_running_loop().run_in_executor(None, data.has, generation):
            raise InvalidRequest(f"no state of generation {generation}'s data is kept")

    async def confirm(self, caller: Caller, generation: int) -> None:
        """Confirm the trial of `generation` (0: the one under way)."""
        with self._call():
            await self._authorize(caller, "Confirm")
            active = self._active
            record = active.record if active is not None else None
            history.confirm_target(record, generation)
            assert active is not None
            log.info("trial_confirm_requested", generation=generation, caller=caller.description)
            active.confirm()

    async def refresh(self, caller: Caller) -> None:
        with self._call():
            await self._authorize(caller, "Refresh")
            if self._active is not None:
                await self._during_trial(self._active, Edit("switch", ()))
            await self._submit(Job("refresh", intent=Intent(_cause(caller))))

    def device_event(self, event: DeviceEvent) -> None:
        self._queue.put_nowait(Job("device", event=event))

    def images_event(self) -> None:
        """Something changed in a search path (adapters/imagedirs.py): look again."""
        self._queue.put_nowait(Job("images"))

    async def _request(
        self, caller: Caller, edit: Edit, timeout: float, trial: TrialOptions | None
    ) -> bool:
        with self._call():
            await self._authorize(caller, edit.action.capitalize())
            check_edit(edit)
            interrupted = self._interrupted.pop(caller.origin, None) if caller.origin else None
            if interrupted is not None:
                raise interrupted
            active = self._active
            if active is not None:
                return await self._during_trial(active, edit)
            if edit.action != "detach":
                await self._wait_for_volumes(edit.names, timeout)
            intent = Intent(
                _cause(caller),
                self._trial_options(trial),
                origins=(caller.origin,) if caller.origin else (),
            )
            return await self._submit(Job("request", edit, intent=intent))

    def _trial_options(self, trial: TrialOptions | None) -> TrialOptions:
        return (trial or TrialOptions()).resolved(self.config.confirm_timeout)

    async def _during_trial(self, active: ActiveTrial, edit: Edit) -> bool:
        """A request while a trial runs: an attach of a name already desired (the ExecStart
        of personality@NAME.service) waits for the trial's outcome; anything else is Busy."""
        if edit.action == "attach" and edit.names[0] in (*self.desired, *active.tried):
            error = await asyncio.shield(active.outcome)
            if error is not None:
                raise error
            if edit.names[0] in self.desired:
                return False
        record = active.record
        what = f"generation {record.generation}" if record is not None else "a new generation"
        raise Busy(
            f"{what} is on trial; confirm it (personalityctl confirm) or roll it back "
            "(personalityctl rollback) first"
        )

    async def _authorize(self, caller: Caller, operation: str) -> None:
        """The one authorization decision (core/access.py), with the group lookup off the loop.

        Every request makes this one lookup, root's too: lookups finish in the order they were
        asked for, so requests keep their order on the way to the queue."""
        self._check_running()
        groups = self.config.allowed_groups if caller.front_end == SPOOL else DEFAULT_GROUPS
        gids = await lookup_group_gids(groups)
        try:
            authorize(caller, operation, groups, gids)
        except PersonalityError:
            refusals.warning(
                caller.uid, "access_denied", operation=operation, caller=caller.description
            )
            raise
        self._check_running()

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
            raise Stopping("personalityd is stopping; ask again once it is back")

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

    async def stop(self, timeout: float = 30.0) -> None:
        """Take no more changes, answer queued requests with Busy, and wait (bounded) for the
        running change and for callers to return: a clean stop never cuts a change in half.
        A trial under way is left as it is: the next start rolls it back."""
        self._stopping.set()
        if self._active is not None:
            self._active.abort()
        while not self._queue.empty():
            _fail(self._queue.get_nowait(), Stopping("personalityd is stopping; ask again later"))
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
        held: Job | None = None  # a trial's job, taken while gathering: it goes alone
        while True:
            batch = [held if held is not None else await self._queue.get()]
            held = None
            while not _on_trial(batch[0]) and len(batch) < MAX_BATCH and not self._queue.empty():
                job = self._queue.get_nowait()
                if _on_trial(job):
                    held = job
                    break
                batch.append(job)
            self._changing = True
            try:
                await self._process(batch)
            except Exception:  # one bad change must not stop the manager
                log.exception("change_crashed")
                for job in batch:
                    _fail(job, InternalError())
            finally:
                self._changing = False

    async def _process(self, batch: list[Job]) -> None:
        present = self.present
        try:
            await self._process_batch(batch)
        finally:
            if self.present != present:  # the listing changed: readers' properties too
                live = self.state.snapshot.live
                self._notify(StackEvent(self.generation, live, (), (), stack_changed=False))

    async def _apply_events(self, batch: Sequence[Job]) -> None:
        for job in batch:
            if job.kind == "device":
                assert job.event is not None
                await self._apply_device_event(job.event)
            elif job.kind == "images":
                await self.registry.images_changed()
            elif job.kind == "refresh":
                # An operator refreshes after fixing a medium: volumes that failed get retried;
                # and image files replaced since they were attached are attached anew.
                self.registry.failed.clear()
                await self.rescan()
                images, taken = self.registry.images, self.registry.devices
                if images is not None and images.refresh_bindings(taken):
                    self.registry.merge()

    async def _process_batch(self, batch: list[Job]) -> None:
        await self._apply_events(batch)
        requests = [j for j in batch if j.kind == "request"]
        original = self.state.desired
        accepted = [job for job in requests if self._edit(job)]
        description = "; ".join(_describe(j) for j in accepted) or "device change"
        requested = frozenset(n for j in accepted for n in _names(j))
        tried = next((j for j in accepted if _on_trial(j)), None)
        loop = asyncio.get_running_loop()
        started: asyncio.Future[bool] = loop.create_future()
        if tried is not None:  # answered at the end of the trial; `started`: services up
            answers: list[Answer] = [(started, True)]
            self._active = ActiveTrial()
        else:
            answers = [(j.future, j.changed) for j in accepted if j.future is not None]
        refreshes = [j.future for j in batch if j.kind == "refresh" and j.future is not None]
        answers += [(future, True) for future in refreshes]
        intents = [j.intent for j in accepted] + [j.intent for j in batch if j.kind == "refresh"]
        intent = intents[0] if intents else DEVICE_CHANGE
        try:
            await self.rebuild(description, requested, answers, intent)
            for job in accepted:
                job.made = self.generation
            if tried is not None:
                await self._try(tried, started)
        except PersonalityError as error:
            self.state.desired = original
            await self._converge()
            if len(accepted) > 1:  # each one alone, for its own exact answer
                for job in accepted:
                    await self._process_batch([job])
            else:
                for job in accepted:
                    _fail(job, error)
                if not requests:
                    log.error("device_change_failed", error=str(error))
            for future in refreshes:
                if not future.done():
                    future.set_result(True)
        finally:
            if tried is not None:
                self._release_trial()

    # -- trials ----------------------------------------------------------------------------

    async def _try(self, job: Job, started: asyncio.Future[bool]) -> None:
        """The trial made by `job`'s change: judge it, then confirm it or roll it back, and
        answer the job (stack/trial.py)."""
        active = self._active
        assert active is not None
        record = self.state.saved.trial
        if record is None or record.generation != self.generation:
            await asyncio.shield(started)  # nothing new to try: answered as any change
            self._release_trial()
            _answer(job, job.changed)
            return
        active.record = record
        active.tried = frozenset(self.desired)
        volumes = self.registry.volumes
        live = [volumes[n] for n in self.state.snapshot.live if n in volumes]
        units = [u for v in live for u in v.manifest.services]
        checks = [u for v in live for u in v.manifest.healthchecks]
        self.stack.journal.trial_started(record.generation, record.deadline_usec, record.manual)
        log.info("trial_started", generation=record.generation, manual=record.manual,
                 deadline_usec=record.deadline_usec, units=units, healthchecks=checks)  # fmt: skip
        failures = self.stack.declaration_failures
        if failures:  # journalled already (stack/follower.py)
            failed = failures[0].run
            whose = f" of '{failed.personality}'" if failed.personality else ""
            outcome: Outcome = Failed(f"{failed.tool or 'declarations'}{whose}: not applied")
        else:
            outcome = await judge(active, self.follower.services, units, checks, started)
        await self._end_trial(job, record, outcome)

    async def _end_trial(self, job: Job, record: TrialRecord, outcome: Outcome) -> None:
        active = self._active
        assert active is not None
        if isinstance(outcome, Aborted):
            log.warning("trial_left_for_next_start", generation=record.generation)
            error: PersonalityError = Stopping(
                f"personalityd stopped during the trial of generation {record.generation}; "
                "the next start rolls it back"
            )
            active.end(error)
            self._active = None
            _fail(job, error)
            return
        if isinstance(outcome, Confirmed):
            saved = self.state.saved
            confirmed = history.with_status(saved.history, record.generation, history.CONFIRMED)
            await self._save(dataclasses.replace(saved, history=confirmed, trial=None))
            self.stack.journal.trial_confirmed(record.generation)
            log.info("trial_confirmed", generation=record.generation)
            active.end(None)
            self._active = None
            _answer(job, job.changed)
            return
        asked = outcome.job if isinstance(outcome, Requested) else None
        reason = outcome.reason if isinstance(outcome, Failed) else BY_REQUEST
        error = await self._roll_back_trial(record, reason, asked, active)
        self._active = None
        _fail(job, error)

    async def _roll_back_trial(
        self, record: TrialRecord, reason: str, asked: object, active: ActiveTrial
    ) -> PersonalityError:
        """Return from the trial `record` to its confirmed generation (or to the one an
        explicit Rollback, `asked`, names) in one change; the error the trial's callers get,
        once the services of the restored stack run again."""
        # The trial stays the one under way until its rollback is done: requests meanwhile
        # are Busy, and an attach of a name it tried gets its error (_during_trial).
        active.ending = True
        # Whatever the target, the upper returns to its state before the trial (where it
        # can: btrfs; the change decides).
        before = record.rollback_to
        intent = Intent(CAUSE_ROLLBACK, ends_trial=record.generation, data_from=before)
        if isinstance(asked, Job) and self._edit(asked):
            target = asked.target
            if asked.intent.data_from is not None:
                intent = dataclasses.replace(intent, data_from=asked.intent.data_from)
        else:
            asked = None  # refused (and answered): the trial still returns to where it was
            target = record.rollback_to
            back = history.find(self.state.saved.history, target)
            if back is not None:
                self.state.desired = back.desired
        log.warning("trial_failed", generation=record.generation, reason=reason)
        # Attaches waiting for the trial (the ExecStart of personality@NAME.service) are
        # answered first, so those units fail on their own and their dependents on the
        # dependency, rather than being cancelled by the stop before the swap back.
        # The trial's own caller may be such an ExecStart too (`systemctl start` of a unit
        # that requires personality@NAME): the units still starting are left to fail on
        # their answer, never stopped (cancelled) before the swap back.
        active.end(_rolled_back(record.generation, reason, self.generation + 1, target))
        restored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            with self.follower.sparing_starting_units(active.tried):
                await self.rebuild(f"roll back generation {record.generation}: {reason}",
                                   frozenset(), [(restored, True)], intent)  # fmt: skip
            await restored
        except PersonalityError as exc:
            log.error("rollback_failed", generation=record.generation, error=str(exc))
            if isinstance(asked, Job):
                _fail(asked, exc)
            return MountFailed(
                f"the trial of generation {record.generation} failed ({reason}), and "
                f"returning to generation {target} failed too: {exc}",
                cause=reason,
            )
        new = self.generation
        self.stack.journal.rolled_back(record.generation, target, new, reason)
        log.warning("rolled_back", generation=record.generation, rolled_back_to=target,
                    new_generation=new, reason=reason)  # fmt: skip
        if isinstance(asked, Job):
            asked.made = new
            _answer(asked, True)
        return _rolled_back(record.generation, reason, new, target)

    def _release_trial(self) -> None:
        """A trial batch whose change made no trial: a Rollback that reached it goes on."""
        active, self._active = self._active, None
        if active is None:
            return
        active.end(None)
        if active.rollback.done():
            job = active.rollback.result()
            if isinstance(job, Job):
                self._queue.put_nowait(job)

    async def _save(self, state: PersistedState) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, save_state, self.config.state_path, state)
        self.state.saved = state

    def _edit(self, job: Job) -> bool:
        """Apply one request to the desired list; False (and the job answered) if refused."""
        assert job.edit is not None
        try:
            edited = edit_desired(
                self.state.desired, job.edit, self.registry.volumes, self.registry.failed
            )
        except PersonalityError as error:
            _fail(job, error)
            return False
        self.state.desired = edited.desired
        job.changed = edited.changed
        return True

    async def _apply_device_event(self, event: DeviceEvent) -> bool:
        if event.action == "rescan":
            return await self.rescan()
        if event.action == "remove":
            identity = self._identity_of(event.device.devnode)
            changed = self.registry.device_gone(event.device.devnode)
            if identity:
                self.indexes.forget(identity)
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
        return await self.registry.images_changed() or changed

    # -- changes and retries ---------------------------------------------------------------

    async def rebuild(
        self,
        requested: str,
        names: frozenset[str] = frozenset(),
        answers: Sequence[Answer] = (),
        intent: Intent = DEVICE_CHANGE,
    ) -> bool:
        """Make the mounted stack match the desired list and the present volumes.

        Returns True when the live stack changed. Raises PersonalityError (with nothing
        visible changed) when the new stack cannot be built. A volume that fails to mount or
        index is marked failed; if nobody asked for it, the stack is planned again without it.
        """
        while True:
            try:
                return await Change(self.stack, requested, answers, intent).run()
            except VolumeFailed as failure:
                error = failure.error
                if error.volume is not None and not isinstance(error, Incompatible):
                    self.registry.mark_failed(error.volume, str(error))  # (refused: already)
                if error.volume is None or error.volume in names:
                    self.stack.journal.change_failed(requested, str(error))
                    raise error from None

    async def _converge(self) -> None:
        """After a failed change: make sure what is mounted matches the restored desired list
        (a no-op unless the failure came after something visible had changed)."""
        try:
            await self.rebuild("return to the desired list after a failed change")
        except PersonalityError as error:
            log.error("converge_failed", error=str(error))

    def _notify(self, event: StackEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("subscriber_failed")

    # -- start-up and draining -------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what an earlier run left and converge to the desired list (before READY)."""
        if self.registry.images is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.registry.images.adopt)
        await self.rescan()
        self.registry.merge()
        self.engine.adopt(self.registry.volumes)
        trial = self.state.saved.trial
        intent, requested = Intent(CAUSE_START), "restore desired list at start"
        if trial is not None:  # never confirmed: the daemon stopped or died during it
            back = history.find(self.state.saved.history, trial.rollback_to)
            if back is not None:
                self.state.desired = back.desired
            # The upper's data returns too where it can (btrfs; the change decides).
            intent = Intent(
                CAUSE_ROLLBACK, ends_trial=trial.generation, data_from=trial.rollback_to
            )
            requested = f"roll back generation {trial.generation}: {INTERRUPTED}"
        if not await adopt(self.stack):
            try:
                await self.rebuild(requested, intent=intent)
            except PersonalityError as error:
                log.error("restore_failed", error=str(error))
        if trial is not None:
            await self._after_interrupted_trial(trial)
        self.stack.settle_images()
        self.engine.clean_work_dirs(self.state.upper, self.generation)
        volumes = self.registry.volumes
        self.follower.remember([volumes[n] for n in self.state.snapshot.live if n in volumes])

    async def _after_interrupted_trial(self, trial: TrialRecord) -> None:
        """Record the end of a trial that a stop or crash interrupted (the change above made
        it, unless what was mounted already was the confirmed stack), and answer its spool
        requests with it when they are read again."""
        saved = self.state.saved
        if saved.trial is not None:
            ended = history.with_status(saved.history, trial.generation, history.ROLLED_BACK)
            new = dataclasses.replace(saved, desired=self.state.desired, history=ended, trial=None)
            try:
                await self._save(new)
            except OSError as exc:
                log.error("state_not_saved", error=str(exc))
                return
        back, new_generation = trial.rollback_to, self.generation
        self.stack.journal.rolled_back(trial.generation, back, new_generation, INTERRUPTED)
        log.warning("rolled_back", generation=trial.generation, rolled_back_to=back,
                    new_generation=new_generation, reason=INTERRUPTED)  # fmt: skip
        error = _rolled_back(trial.generation, INTERRUPTED, new_generation, back)
        self._interrupted = dict.fromkeys(trial.origins, error)

    async def watch_draining(self, interval: float = 0.5) -> None:
        """Report a volume as draining until the kernel releases its device."""
        while True:
            await asyncio.sleep(interval)
            if not self.state.draining:
                continue
            present = self.present
            for name, devnode in list(self.state.draining.items()):
                if not device_busy(devnode):
                    del self.state.draining[name]
                    log.info("volume_released", name=name, device=devnode)
            if self.present != present:
                live = self.state.snapshot.live
                self._notify(StackEvent(self.generation, live, (), (), stack_changed=False))


def _same_listing_key(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """The volumes and the snapshot by identity (cheap, and they are replaced whenever they
    change), the rest by value."""
    return a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


def _fail(job: Job, error: PersonalityError) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(error)


def _rolled_back(generation: int, reason: str, new: int, target: int) -> RolledBack:
    return RolledBack(
        f"generation {generation} was rolled back ({reason}); generation {new} has the stack "
        f"of generation {target}",
        cause=reason,
    )


def _answer(job: Job, value: bool) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_result(value)


def _on_trial(job: Job) -> bool:
    return job.kind == "request" and job.intent.trial.length > 0


def _now_usec() -> int:
    return time.time_ns() // 1000


def _names(job: Job) -> tuple[str, ...]:
    return job.edit.names if job.edit is not None else ()


def _describe(job: Job) -> str:
    return job.edit.describe() if job.edit is not None else job.kind
