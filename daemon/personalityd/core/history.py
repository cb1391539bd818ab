"""The generation history and the trial record: the rules, without I/O.

Each generation of the live stack is kept with the desired list it was made for, when, why
(its cause) and whether it is confirmed, on trial or was rolled back. The history holds the
last `limit` of them, but never lets go of the newest confirmed one: that is where a trial
returns to, whatever happened since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from personalityd.core.errors import InvalidRequest
from personalityd.core.model import DesiredEntry

CONFIRMED = "confirmed"
TRIAL = "trial"
ROLLED_BACK = "rolled-back"
STATUSES = (CONFIRMED, TRIAL, ROLLED_BACK)

# What made a change.
CAUSE_DBUS = "dbus"
CAUSE_SPOOL = "spool"
CAUSE_UDEV = "udev"  # device events, and image files coming and going
CAUSE_ROLLBACK = "rollback"  # Rollback from any front end, and automatic rollbacks
CAUSE_START = "start"  # a rebuild at start-up
CAUSES = (CAUSE_DBUS, CAUSE_SPOOL, CAUSE_UDEV, CAUSE_ROLLBACK, CAUSE_START)

MANUAL = "manual"
AUTO = "auto"
CONFIRM_MODES = (AUTO, MANUAL)


@dataclass(frozen=True)
class Generation:
    number: int
    desired: tuple[DesiredEntry, ...]  # bottom first
    realtime_usec: int
    status: str
    cause: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.desired)


@dataclass(frozen=True)
class TrialRecord:
    """A generation on trial, as persisted: what a start after a crash needs to undo it."""

    generation: int
    rollback_to: int  # the confirmed generation whose desired list a failure restores
    deadline_usec: int  # CLOCK_REALTIME
    manual: bool = False
    # The spool files whose request made the trial: after a crash they are answered with
    # the rollback instead of being run again.
    origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrialOptions:
    """What a request asks for: a trial of `seconds` (0: none; None: the configured
    default), confirmed by its checks, or in manual mode by its checks and a Confirm."""

    seconds: int | None = None
    manual: bool = False

    def resolved(self, default: int) -> TrialOptions:
        return self if self.seconds is not None else TrialOptions(default, self.manual)

    @property
    def length(self) -> int:
        return self.seconds or 0


def record(history: Sequence[Generation], entry: Generation, limit: int) -> tuple[Generation, ...]:
    """`history` with `entry` added (replacing one of the same number), pruned to `limit`."""
    kept = [g for g in history if g.number != entry.number]
    kept.append(entry)
    kept.sort(key=lambda g: g.number)
    return prune(kept, limit)


def prune(history: Sequence[Generation], limit: int) -> tuple[Generation, ...]:
    """The newest `limit` generations, oldest first, always with the newest confirmed one."""
    newest = list(history[-limit:]) if limit > 0 else []
    confirmed = last_confirmed(history)
    if confirmed is not None and confirmed not in newest:
        newest = [confirmed, *newest[1:]] if len(newest) >= limit else [confirmed, *newest]
    return tuple(newest)


def with_status(history: Sequence[Generation], number: int, status: str) -> tuple[Generation, ...]:
    return tuple(replace(g, status=status) if g.number == number else g for g in history)


def with_desired(
    history: Sequence[Generation], number: int, desired: tuple[DesiredEntry, ...]
) -> tuple[Generation, ...]:
    """The desired list of generation `number` changed without a new generation (an attach
    of a volume that is not there yet): its entry shows the list it now lives under."""
    return tuple(replace(g, desired=desired) if g.number == number else g for g in history)


def find(history: Sequence[Generation], number: int) -> Generation | None:
    return next((g for g in history if g.number == number), None)


def last_confirmed(history: Sequence[Generation], below: int | None = None) -> Generation | None:
    """The newest confirmed generation (with a number lower than `below`, if given)."""
    for g in reversed(history):
        if g.status == CONFIRMED and (below is None or g.number < below):
            return g
    return None


def rollback_target(history: Sequence[Generation], current: int, requested: int) -> Generation:
    """The generation a Rollback(`requested`) returns to. 0: the newest confirmed one older
    than the current, so two in a row flip between two stacks. Raises InvalidRequest."""
    if requested == 0:
        target = last_confirmed(history, below=current)
        if target is None:
            raise InvalidRequest(
                f"there is no confirmed generation before generation {current} to roll back to"
            )
        return target
    target = find(history, requested)
    if target is None:
        known = ", ".join(str(g.number) for g in history) or "none"
        raise InvalidRequest(
            f"generation {requested} is not in the history (generations kept: {known})"
        )
    return target


def confirm_target(trial: TrialRecord | None, requested: int) -> TrialRecord:
    """The trial a Confirm(`requested`) confirms (0: the current one). Raises InvalidRequest."""
    if trial is None:
        what = "no generation" if requested == 0 else f"generation {requested} is not"
        raise InvalidRequest(f"{what} on trial; there is nothing to confirm")
    if requested not in (0, trial.generation):
        raise InvalidRequest(
            f"generation {requested} is not on trial (generation {trial.generation} is)"
        )
    return trial


DEFAULT_TRIAL = TrialOptions()  # the configured length, confirmed by the checks


@dataclass(frozen=True)
class Intent:
    """Why a change is made, as the history records it."""

    cause: str = CAUSE_UDEV
    trial: TrialOptions = TrialOptions(0)
    origins: tuple[str, ...] = ()  # spool files of the requests (see TrialRecord.origins)
    ends_trial: int | None = None  # a rollback that ends this generation's trial
    # The upper returns to this generation's kept state: on a btrfs writable volume that
    # kept it; elsewhere the change goes on without (a Rollback asking for it is refused).
    data_from: int | None = None


DEVICE_CHANGE = Intent(CAUSE_UDEV)  # a change no request asked for


def after_change(
    history: Sequence[Generation],
    trial: TrialRecord | None,
    generation: int,
    made: int,
    desired: tuple[DesiredEntry, ...],
    intent: Intent,
    now_usec: int,
    limit: int,
) -> tuple[tuple[Generation, ...], TrialRecord | None]:
    """The history and trial once a change of `generation` made generation `made` (the same
    number when the live stack stayed as it was) for `desired`."""
    kept = tuple(history)
    if intent.ends_trial is not None:
        kept, trial = with_status(kept, intent.ends_trial, ROLLED_BACK), None
    if made == generation:
        if intent.ends_trial is None:
            kept = with_desired(kept, generation, desired)
        return kept, trial
    on_trial = intent.trial.length > 0
    entry = Generation(made, desired, now_usec, TRIAL if on_trial else CONFIRMED, intent.cause)
    kept = record(kept, entry, limit)
    if on_trial:
        back = last_confirmed(kept, below=made)
        trial = TrialRecord(
            generation=made,
            rollback_to=back.number if back is not None else 0,
            deadline_usec=now_usec + intent.trial.length * 1_000_000,
            manual=intent.trial.manual,
            origins=intent.origins,
        )
    return kept, trial
