"""The life of one change of the stack, from prepare to publish: the `Change` transaction.

- prepare: mount the live volumes, check that each mount shows what was probed (else probe it
  again and plan again), index them, plan, compute the conflict report, and build each
  changed hierarchy's new overlay as a detached mount where nobody sees it;
- commit: persist the state, stop the units of leaving personalities (stack/follower.py),
  then swap each hierarchy (the new overlay beneath the old one, then the old top lazily
  unmounted);
- undo: every step records its undo as it is made; a failure runs them newest first, so
  nothing visible changes;
- publish: release leaving volumes, write the runtime record and `conflicts.json`, journal
  the report, replace the readers' snapshot, signal subscribers, apply the declarations; the
  follower answers the callers once the services of the joining personalities started.

Only the manager's consumer runs a change, one at a time. Blocking work (walks, mounts,
fsync) runs in worker threads so readers are answered meanwhile; only the consumer touches
the engine, so this is race-free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from personalityd.adapters.declarations import ToolFailure
from personalityd.adapters.imagefile import EntryFailed
from personalityd.adapters.journal import Journal
from personalityd.adapters.mounts import Detached
from personalityd.adapters.probe import symlinked_hierarchy
from personalityd.adapters.state import PersistedState, save_state, write_conflict_report
from personalityd.config import Config
from personalityd.core.errors import Incompatible, MountFailed, NoSuchPersonality, PersonalityError
from personalityd.core.history import DEVICE_CHANGE, Intent, after_change
from personalityd.core.model import (
    IMAGE_DIRECTORY,
    IMAGE_FILE,
    ConflictReport,
    DesiredEntry,
    StackEvent,
    StackPlan,
    Volume,
)
from personalityd.core.planner import check_layer_limit, plan_stack
from personalityd.core.protected import index_lookup, protected_violation
from personalityd.stack import orphans
from personalityd.stack.engine import Engine
from personalityd.stack.follower import Follower
from personalityd.stack.indexes import VolumeIndex, VolumeIndexes
from personalityd.stack.layout import NO_UPPER, OverlaySpec, Upper
from personalityd.stack.registry import VolumeRegistry
from personalityd.stack.upperdata import UpperData

log = structlog.get_logger()

Answer = tuple["asyncio.Future[bool]", bool]  # a caller's future and what it is answered


@dataclass(frozen=True)
class Snapshot:
    """What readers see; replaced as a whole when a change is published."""

    generation: int = 0
    live: tuple[str, ...] = ()
    report: ConflictReport = field(default_factory=lambda: ConflictReport((), 0))


@dataclass
class StackState:
    """The stack as the daemon knows it. Read by anyone; written only by changes."""

    desired: tuple[DesiredEntry, ...]
    saved: PersistedState  # what state.json holds
    snapshot: Snapshot
    upper: Upper = NO_UPPER
    draining: dict[str, str] = field(default_factory=dict)  # name -> device still held
    # The indexes of the live stack, by name: what a personality that leaves provided, even
    # when its device is gone (its orphans, stack/orphans.py).
    indexed: dict[str, VolumeIndex] = field(default_factory=dict)

    def desired_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.desired)


@dataclass
class Stack:
    """Everything a change works with."""

    config: Config
    engine: Engine
    indexes: VolumeIndexes
    registry: VolumeRegistry
    journal: Journal
    follower: Follower  # declarations and services around the swap (stack/follower.py)
    state: StackState
    notify: Callable[[StackEvent], None]
    # Live volumes' identity -> (the index judged, why it touches a protected path or None),
    # so that an index is judged once, and one no longer live is not kept alive here.
    _protected: dict[str, tuple[VolumeIndex, str | None]] = field(default_factory=dict)
    upper_data: UpperData | None = None  # a btrfs writable volume's subvolumes, if any
    # The declarations the last change could not apply: a trial fails on the first.
    declaration_failures: list[ToolFailure] = field(default_factory=list)

    def current_upper(self) -> Upper:
        """The upper for the next generation: on a btrfs writable volume, its live
        subvolume (the one state.json names, made on first use)."""
        self.upper_data = None
        writable = self.registry.writable
        if writable is not None:
            try:
                upper = self.engine.writable_upper(writable)
                assert upper.root is not None
                self.upper_data = UpperData.open(upper.root)
                if self.upper_data is None:
                    return upper
                live, root = self.upper_data.live_root(self.state.saved.upper_data)
                return dataclasses.replace(upper, root=root, live=live)
            except OSError as exc:
                log.error("writable_mount_failed", device=writable.devnode, error=str(exc))
                self.upper_data = None
        if self.config.writable_fallback == "tmpfs":
            return self.engine.tmpfs_upper()
        return NO_UPPER

    def upper_description(self) -> str:
        upper = self.state.upper
        return {
            "volume": f"{upper.device}, not btrfs or with an upper from before subvolumes",
            "tmpfs": "a tmpfs",
        }.get(upper.kind, "none (a read-only stack)")

    def settle_images(self) -> None:
        """Let go of the daemon's loop devices that no volume mount of the stack uses."""
        self.registry.settle_images({m.identity for m in self.engine.volumes.values()})

    def plan(self, volumes: dict[str, Volume], indexed: bool = True) -> StackPlan:
        """The planned stack; `indexed=False` gives the live names before indexes exist.

        With the indexes, each live volume is first held against `volumes.protected_paths`
        on the index of the very mount that will be stacked: one that touches a protected
        path is refused (raises VolumeFailed with Incompatible; see `refuse_protected`)."""
        if indexed:
            self.refuse_protected(volumes)
        provided = self.indexes.provides(volumes) if indexed else (lambda n, h: True)
        return plan_stack(self.state.desired, volumes, provided, self.config.hierarchies)

    def refuse_protected(self, volumes: dict[str, Volume]) -> None:
        """Refuse a live volume whose index touches a protected path: it gets its refusal
        (listed as incompatible, never stacked, whatever `force` says) in `volumes` and in
        the registry, the refusal is journalled, and VolumeFailed(Incompatible) is raised so
        that a caller who asked for it gets the error and a change made without it."""
        protected, hierarchies = self.config.protected_paths, self.config.hierarchies
        if not protected:
            return
        live = plan_stack(self.state.desired, volumes, lambda n, h: True, hierarchies).live
        judged_before, self._protected = self._protected, {}  # only live ones are kept
        for name in live:
            volume = volumes[name]
            index = self.indexes.cached(volume)
            if index is None:
                continue
            judged = judged_before.get(volume.device.identity)
            if judged is not None and judged[0] is index:
                reason = judged[1]
            else:
                reason = protected_violation(protected, hierarchies, *index_lookup(index))
            self._protected[volume.device.identity] = (index, reason)
            if reason is None:
                continue
            refused = dataclasses.replace(volume, refusal=reason)
            volumes[name] = refused
            if self.registry.volumes.get(name) is volume:
                self.registry.replace(name, refused)
            device = volume.device.devnode
            log.warning("volume_refused", device=device, name=name, reason=reason)
            self.journal.volume_refused(device, name, reason)
            message = f"'{name}' may not be stacked: {reason}"
            raise VolumeFailed(Incompatible(message, volume=name, cause=reason))


class VolumeFailed(Exception):
    """A volume of the live stack could not be mounted or indexed (`error.volume` says which);
    the manager marks it failed and plans again without it. With an Incompatible error the
    volume was refused (a protected path): it is not marked failed, only left out."""

    def __init__(self, error: PersonalityError) -> None:
        super().__init__(str(error))
        self.error = error


class UndoLog:
    """The undo of every step made so far, run newest first when the change fails."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple[str, Callable[[], object]]] = {}
        self._next = 0

    def add(self, what: str, undo: Callable[[], object]) -> int:
        self._next += 1
        self._steps[self._next] = (what, undo)
        return self._next

    def discard(self, *tokens: int) -> None:
        """Steps whose result now belongs to someone else (e.g. the swap)."""
        for token in tokens:
            self._steps.pop(token, None)

    def run(self) -> None:
        for token in sorted(self._steps, reverse=True):
            what, undo = self._steps.pop(token)
            try:
                undo()
            except Exception:
                log.exception("undo_failed", step=what)


# A volume whose content changed since it was probed is probed again and the live set planned
# again; a change gives up when the content is still moving after this many rounds.
CHECK_ROUNDS = 3


@dataclass
class Checked:
    """The live volumes of a change, mounted and checked to hold what was probed."""

    volumes: dict[str, Volume]  # the usable volumes after any new probe
    live: tuple[str, ...]
    mounts: list[int]  # undo tokens of the volume mounts made
    content: dict[str, str]  # name -> content key of what is mounted
    probed_again: list[str]  # names whose content had changed since their probe


async def mount_checked(stack: Stack, undo: UndoLog) -> Checked:
    """Mount the live volumes (the new mounts' undo goes to `undo`) and make sure that what is
    mounted is what was probed: each mounted tree's hierarchies must be real directories and
    its device's content key the probed one. A volume that fails this is probed again through
    that very mount (stack/registry.py), which may refuse it, rename it or accept it as it is
    now, and the live set is planned again. Raises VolumeFailed naming the volume."""
    made: list[int] = []
    again: list[str] = []
    changed: list[Volume] = []
    for _ in range(CHECK_ROUNDS):
        volumes = stack.registry.usable()
        live = stack.plan(volumes, indexed=False).live
        if await _attach_images(stack, [volumes[n] for n in live]):
            volumes = stack.registry.usable()
            live = stack.plan(volumes, indexed=False).live
        new, content, changed = await _mount_and_look(stack, [volumes[n] for n in live], undo)
        made += new
        if not changed:
            return Checked(volumes, live, made, content, again)
        for volume in changed:
            again.append(volume.name)
            await stack.registry.probe_again(volume)
    volume = changed[0]
    raise VolumeFailed(
        MountFailed(
            f"the content of volume '{volume.name}' on {volume.device.devnode} kept changing "
            f"while it was checked ({CHECK_ROUNDS} times)",
            volume=volume.name,
        )
    )


async def _attach_images(stack: Stack, volumes: Sequence[Volume]) -> bool:
    """Make the loop devices of the image files about to be stacked (stack/images.py);
    True when any was made. Raises VolumeFailed naming the first that failed."""
    images = stack.registry.images
    names = [v.name for v in volumes if v.source is not None and v.source.kind == IMAGE_FILE]
    if images is None or not names:
        return False
    outcomes = await images.attach(names)
    stack.registry.merge()
    for name, outcome in outcomes.items():
        if isinstance(outcome, EntryFailed):
            raise VolumeFailed(MountFailed(str(outcome), volume=name, cause=str(outcome)))
        # The probe's walk indexed the file this loop reads: `index_checked` uses that index
        # only if the mount's content key, taken after mounting, is the probe's.
        probed = images.take_index(outcome)
        if probed is not None:
            stack.indexes.seed(outcome, *probed)
    return bool(outcomes)


async def _mount_and_look(
    stack: Stack, volumes: Sequence[Volume], undo: UndoLog
) -> tuple[list[int], dict[str, str], list[Volume]]:
    """Mount (if needed) each volume; then (undo tokens of the mounts made, content key per
    name, the volumes whose mounted tree is not what was probed)."""
    engine = stack.engine
    made: list[int] = []
    for volume in volumes:
        mounted = engine.volumes.get(volume.name)
        if mounted is not None and mounted.identity != volume.device.identity:
            engine.unmount_volume(volume.name)
            mounted = None
        if mounted is None:
            try:
                _mount(stack, volume)
            except OSError as exc:
                raise VolumeFailed(_volume_error(volume, exc)) from exc
            unmount = functools.partial(engine.unmount_volume, volume.name)
            made.append(undo.add(f"unmount {volume.name}", unmount))
    hierarchies = tuple(stack.config.hierarchies)
    trees = [(v, engine.volumes[v.name].path) for v in volumes]
    # One worker thread for all of them: each look is a fraction of a millisecond, less than
    # a thread hop.
    looks = await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: [_look_at_mount(stack.registry, v, path, hierarchies) for v, path in trees],
    )
    content: dict[str, str] = {}
    changed: list[Volume] = []
    for volume, look in zip(volumes, looks, strict=True):
        if isinstance(look, OSError):
            raise VolumeFailed(_volume_error(volume, look)) from look
        key, symlinked = look
        content[volume.name] = key
        if symlinked is not None or key != stack.registry.checked_content(volume):
            log.warning(
                "volume_not_as_probed",
                name=volume.name,
                device=volume.device.devnode,
                reason=symlinked or "content key changed",
            )
            changed.append(volume)
    return made, content, changed


def _mount(stack: Stack, volume: Volume) -> None:
    """Mount `volume` at `<mount_root>/<name>`: a directory tree from a fresh, checked open
    of its entry (stack/images.py); anything else from its block device."""
    images = stack.registry.images
    if volume.source is None or volume.source.kind != IMAGE_DIRECTORY or images is None:
        stack.engine.mount_volume(volume)
        return
    fd = images.open_directory(volume)
    try:
        stack.engine.mount_volume(volume, tree_fd=fd)
    finally:
        os.close(fd)


def _look_at_mount(
    registry: VolumeRegistry, volume: Volume, path: str, hierarchies: Sequence[str]
) -> tuple[str, str | None] | OSError:
    """(content key of `volume`, refusal if a hierarchy in the tree mounted at `path` is a
    symlink), or the OSError that kept it from looking: taken after the mount, so a key equal
    to the probed one means this mount shows the probed content."""
    try:
        return registry.current_content(volume, path), symlinked_hierarchy(path, hierarchies)
    except OSError as exc:
        return exc


async def index_checked(stack: Stack, checked: Checked) -> None:
    """Index each live volume of `checked` (cached per content). Raises VolumeFailed."""
    engine = stack.engine
    volumes = [checked.volumes[n] for n in checked.live]
    # The walks run side by side in worker threads: they are mostly kernel work (directory
    # blocks read and decompressed) done with the GIL released.
    outcomes = await asyncio.gather(
        *(
            stack.indexes.index(v, engine.volumes[v.name].path, checked.content[v.name])
            for v in volumes
        ),
        return_exceptions=True,
    )
    for volume, outcome in zip(volumes, outcomes, strict=True):
        if isinstance(outcome, OSError):
            raise VolumeFailed(_volume_error(volume, outcome)) from outcome
        if isinstance(outcome, BaseException):
            raise outcome


def _changed_error(stack: Stack, name: str, devnode: str) -> PersonalityError:
    """Why a volume that, probed again, is no longer usable is left out of the stack."""
    volume = stack.registry.volumes.get(name)
    reason = None if volume is None else (volume.refusal or volume.incompatibility)
    if volume is not None and reason is not None:
        what = "is incompatible with the base" if volume.refusal is None else "may not be stacked"
        return Incompatible(
            f"'{name}' on {devnode} changed since it was checked; checked again, it {what}: "
            f"{reason}",
            volume=name,
            cause=reason,
        )
    return NoSuchPersonality(
        f"the volume on {devnode} changed since it was checked and no longer holds '{name}'",
        volume=name,
    )


def _volume_error(volume: Volume, exc: OSError) -> MountFailed:
    cause = exc.strerror or str(exc)
    return MountFailed(
        f"cannot use volume '{volume.name}' on {volume.device.devnode}: {exc}",
        volume=volume.name,
        cause=cause,
    )


class Change:
    """One change of the live stack (see the module docstring)."""

    def __init__(
        self,
        stack: Stack,
        requested: str,
        answers: Sequence[Answer] = (),
        intent: Intent = DEVICE_CHANGE,
    ) -> None:
        self.stack = stack
        self.requested = requested  # what was asked, for the journal and the log
        self.answers = answers
        self.intent = intent  # why: the history's cause, a trial, a rollback (core/history.py)
        self.undo = UndoLog()
        self.before = stack.state.snapshot
        self.volumes: dict[str, Volume] = {}
        self.plan = StackPlan((), {})
        self.upper = NO_UPPER
        self.generation = self.before.generation
        self.report = ConflictReport((), 0)
        self.wanted: dict[str, OverlaySpec | None] = {}
        self._mounts: list[int] = []  # undo tokens of the volume mounts this change made
        self._built_items: dict[str, Detached | str] = {}
        self._built = 0  # undo token of releasing them
        self.moved: list[orphans.Moved] = []  # orphans moved aside (stack/orphans.py)
        self._moved = 0  # undo token of putting them back
        self.swap_ms = 0.0
        self.declaration_failures: list[ToolFailure] = []  # for a trial to judge
        self.left_live: str | None = None  # btrfs: the live subvolume this change leaves

    async def run(self) -> bool:
        """Prepare, commit and publish; True when the live stack changed. On failure nothing
        visible has changed (but for a swap the kernel refused part-way) and it raises the
        PersonalityError for the caller, or VolumeFailed."""
        try:
            if not await self.prepare():
                await self.publish_unchanged()
                return False
            await self.commit()
        except VolumeFailed:
            self._undo()
            raise
        except PersonalityError as error:
            self._undo()
            self.stack.journal.change_failed(self.requested, str(error))
            log.error("change_failed", requested=self.requested, error=str(error))
            raise
        except BaseException:
            self._undo()
            raise
        await self.publish()
        return True

    def _undo(self) -> None:
        self.undo.run()
        self.stack.settle_images()

    # -- prepare ---------------------------------------------------------------------------

    async def prepare(self) -> bool:
        """Everything new, made where nobody looks. False when there is nothing to change."""
        stack = self.stack
        devnodes = {n: v.device.devnode for n, v in stack.registry.volumes.items()}
        checked = await mount_checked(stack, self.undo)
        self.volumes = checked.volumes
        self._mounts = checked.mounts
        self._drop_probed_again(checked, devnodes)
        await index_checked(stack, checked)
        # The live subvolume in use (at start, before anything was adopted, the one
        # state.json names), taken before this change records its own.
        self.left_live = stack.state.upper.live or stack.state.saved.upper_data
        self.upper = stack.current_upper()
        await self._restore_data()
        self.plan = stack.plan(self.volumes)
        if self.plan.live == self.before.live and stack.engine.is_current(self.plan, self.upper):
            return False
        self.generation = self.before.generation + 1
        check_layer_limit(self.plan, stack.config.max_layers)
        loop = asyncio.get_running_loop()
        indexes, engine = stack.indexes, stack.engine
        self.report = await loop.run_in_executor(
            None, indexes.conflict_report, self.plan, self.volumes
        )
        self.wanted = engine.specs_for(self.plan, self.upper)
        # Before the new overlay is built, so that it never sees them (stack/orphans.py).
        self.moved = moved = await loop.run_in_executor(None, self._move_orphans)
        if moved:
            self._moved = self.undo.add("put the orphans back", lambda: orphans.put_back(moved))
        built = await loop.run_in_executor(None, engine.build, self.wanted, self.generation)
        self._built_items = built
        self._built = self.undo.add("release the built overlays", lambda: engine.release(built))
        return True

    async def _restore_data(self) -> None:
        """With intent.data_from: the new generation's upper is a writable snapshot of that
        generation's kept state (btrfs; stack/upperdata.py)."""
        data, generation = self.stack.upper_data, self.intent.data_from
        if generation is None or data is None:
            return
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, data.has, generation):
            log.warning("upper_data_not_kept", generation=generation)
            return
        try:
            live, root = await loop.run_in_executor(
                None, data.restore, generation, self.before.generation + 1
            )
        except OSError as exc:
            raise MountFailed(
                f"cannot return the upper to generation {generation}'s data: {exc}",
                cause=str(exc),
            ) from exc
        self.undo.add("discard the restored upper", lambda: data.discard(live))
        self.upper = dataclasses.replace(self.upper, root=root, live=live)
        log.info("upper_data_restored", generation=generation, live=live)

    def _keep_data(self) -> None:
        """Right before the swap (in a worker thread): the state of the generation being
        left, and, when the upper itself is replaced, the writes made since (never deleted)."""
        data, left = self.stack.upper_data, self.left_live
        if data is None or left is None:
            return
        try:
            data.keep(self.before.generation, left)
            if self.upper.live != left:
                data.keep_rolled_back(self.before.generation, left)
        except OSError as exc:
            log.error("upper_snapshot_failed", generation=self.before.generation, error=str(exc))

    def _prune_data(self) -> None:
        data, live = self.stack.upper_data, self.upper.live
        if data is None or live is None:
            return
        kept = {g.number for g in self.stack.state.saved.history}
        pruned = data.prune(kept, live)
        if pruned.deleted:
            log.info("upper_snapshots_pruned", deleted=pruned.deleted)

    def _move_orphans(self) -> list[orphans.Moved]:
        """Move aside what the upper holds under directories that leave the stack with the
        personalities that leave it (in a worker thread)."""
        stack, leaving = self.stack, self._gone()
        if self.upper.root is None or not leaving:
            return []
        indexed = stack.state.indexed
        old = [(n, indexed[n]) for n in reversed(self.before.live) if n in indexed]
        staying = _indexed(stack, self.volumes, self.plan.live)
        new = {
            h: [(n, staying[n]) for n in names if n in staying]
            for h, names in self.plan.layers.items()
        }
        layout, hierarchies = stack.engine.layout, stack.config.hierarchies
        try:
            found = orphans.find(layout, self.upper, hierarchies, old, new, leaving)
        except OSError as exc:
            log.warning("orphans_not_looked_for", error=str(exc))
            return []
        return orphans.move_aside(self.upper, self.generation, found)

    def _drop_probed_again(self, checked: Checked, devnodes: dict[str, str]) -> None:
        """A volume that, probed again, is no longer part of the live stack (refused, now
        incompatible, or holding another name) fails the change with VolumeFailed: a
        caller who asked for it gets the error, and the manager plans again without it."""
        for name in dict.fromkeys(checked.probed_again):
            if name not in checked.live:
                error = _changed_error(self.stack, name, devnodes.get(name, "its device"))
                raise VolumeFailed(error)

    # -- commit ----------------------------------------------------------------------------

    async def commit(self) -> None:
        stack = self.stack
        loop = asyncio.get_running_loop()
        previous = stack.state.saved
        try:
            await loop.run_in_executor(None, self._persist, self.generation)
        except OSError as exc:
            raise MountFailed(f"cannot save the state: {exc}", cause=str(exc)) from exc
        self.undo.add("restore the saved state", lambda: self._restore(previous))
        gone = self._gone()
        if gone:
            await stack.follower.before_swap(gone, stack.registry.volumes, stack.engine.volumes)
        await loop.run_in_executor(None, self._keep_data)
        # From here the overlays and the volume mounts belong to the swap.
        self.undo.discard(self._built, self._moved, *self._mounts)
        started = time.monotonic()
        try:
            stack.engine.swap(self.wanted, self._built_items)
        except OSError as exc:
            log.error("swap_failed", requested=self.requested, error=str(exc))
            raise MountFailed(f"swapping in the new stack failed: {exc}", cause=str(exc)) from exc
        self.swap_ms = (time.monotonic() - started) * 1000

    def _gone(self) -> list[str]:
        """The names that leave the live stack, for any reason (a yanked volume too)."""
        return [n for n in self.before.live if n not in self.plan.live]

    def _persist(self, generation: int) -> None:
        state, saved = self.stack.state, self.stack.state.saved
        history, trial = after_change(
            saved.history,
            saved.trial,
            self.before.generation,
            generation,
            state.desired,
            self.intent,
            time.time_ns() // 1000,
            self.stack.config.history,
        )
        new = dataclasses.replace(
            saved, desired=state.desired, generation=generation, history=history, trial=trial,
            upper_data=self.upper.live or saved.upper_data,
        )  # fmt: skip
        if new != state.saved:
            save_state(self.stack.config.state_path, new)
            state.saved = new

    def _restore(self, previous: PersistedState) -> None:
        state = self.stack.state
        if state.saved != previous:
            save_state(self.stack.config.state_path, previous)
            state.saved = previous

    # -- publish ---------------------------------------------------------------------------

    async def publish_unchanged(self) -> None:
        """Nothing to swap; the desired list may still have changed (a pending attach)."""
        state = self.stack.state
        desired_before = tuple(e.name for e in state.saved.desired)
        await asyncio.get_running_loop().run_in_executor(None, self._persist, self.generation)
        state.upper = self.upper
        self.stack.settle_images()
        if desired_before != state.desired_names():
            live = self.before.live
            self.stack.notify(StackEvent(self.generation, live, (), (), stack_changed=False))
        self.stack.follower.answer_after(self._answer)  # after earlier changes' services

    async def publish(self) -> None:
        stack, state, plan = self.stack, self.stack.state, self.plan
        mounted = dict(stack.engine.volumes)  # the leaving ones too, for the follower
        for name in list(stack.engine.volumes):
            if name not in plan.live:
                gone = stack.engine.unmount_volume(name)
                if gone is not None:
                    state.draining[name] = gone.devnode
        for name in plan.live:
            state.draining.pop(name, None)
        stack.settle_images()
        await asyncio.get_running_loop().run_in_executor(None, self._record)
        state.upper = self.upper
        state.snapshot = Snapshot(self.generation, plan.live, self.report)
        state.indexed = _indexed(stack, self.volumes, plan.live)
        if self.upper.kind == "tmpfs":
            log.warning("writable_volatile", reason="no writable volume; writes go to a tmpfs")
        log.info(
            "stack_changed",
            generation=self.generation,
            attached=" ".join(plan.live),
            conflicts=len(self.report.conflicts),
            overrides=self.report.overrides,
            masks=len(self.report.masks),
            swap_ms=round(self.swap_ms, 3),
        )
        before = self.before.live
        stack.notify(
            StackEvent(
                generation=self.generation,
                attached=plan.live,
                newly_attached=tuple(n for n in plan.live if n not in before),
                detached=tuple(n for n in before if n not in plan.live),
            )
        )
        stack.engine.clean_work_dirs(self.upper, self.generation)
        stack.engine.release_writable(self.upper)
        arriving = [self.volumes[n] for n in plan.live if n not in before]
        # Declarations now; services, then the answers, in the follower's task.
        self.declaration_failures = await stack.follower.after_swap(
            self.generation, arriving, self._gone(), mounted, self._answer
        )
        stack.declaration_failures = self.declaration_failures

    def _record(self) -> None:
        """The files and journal entries of the change (in a worker thread)."""
        stack = self.stack
        stack.engine.write_record(self.generation)
        try:
            self._prune_data()
        except OSError as exc:
            log.warning("upper_prune_failed", error=str(exc))
        for moved in self.moved:
            stack.journal.orphan_moved(moved.orphan, moved.generation, moved.on_volume)
        for again in orphans.written_again(self.moved):
            log.warning("orphan_written_again", path=again.orphan.path, moved_to=again.target)
        runtime = stack.config.runtime_path
        try:
            write_conflict_report(runtime, self.generation, self.plan.live, self.report)
        except OSError as exc:
            log.error("conflict_report_not_written", error=str(exc))
        stack.journal.report_stack(self.generation, self.plan.live, self.report)

    def _answer(self) -> None:
        for future, value in self.answers:
            if not future.done():
                future.set_result(value)


async def adopt(stack: Stack) -> bool:
    """After the engine adopted what an earlier run left mounted: True when that is exactly the
    planned stack (then it is published as the current generation), False when a change must
    rebuild it."""
    undo = UndoLog()
    try:
        checked = await mount_checked(stack, undo)
        volumes = checked.volumes
        await index_checked(stack, checked)
    except VolumeFailed as failure:
        undo.run()
        log.error("adopt_index_failed", error=str(failure.error))
        volumes = stack.registry.usable()
    upper = stack.current_upper()
    try:
        plan = stack.plan(volumes)
    except VolumeFailed:  # refused now: the rebuild at start leaves it out
        return False
    if not stack.engine.is_current(plan, upper):
        return False
    loop = asyncio.get_running_loop()
    report = await loop.run_in_executor(None, stack.indexes.conflict_report, plan, volumes)
    state = stack.state
    state.upper = upper
    state.snapshot = Snapshot(state.snapshot.generation, plan.live, report)
    state.indexed = _indexed(stack, volumes, plan.live)
    runtime = stack.config.runtime_path
    write_conflict_report(runtime, state.snapshot.generation, plan.live, report)
    log.info("stack_restored", generation=state.snapshot.generation, attached=" ".join(plan.live))
    return True


def _indexed(
    stack: Stack, volumes: dict[str, Volume], live: Sequence[str]
) -> dict[str, VolumeIndex]:
    """The cached index of each live personality, by name."""
    found = {n: stack.indexes.cached(volumes[n]) for n in live if n in volumes}
    return {n: index for n, index in found.items() if index is not None}
