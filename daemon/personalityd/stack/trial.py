"""Judging a generation on trial: its units, the deadline, Confirm and Rollback.

The manager's consumer waits for `judge` after a change made with a trial; nothing else is
changed meanwhile. The outcome is one of:

- `Confirmed`: before the deadline, every `PERSONALITY_SERVICES` unit of the live stack is
  active (and stays so for SETTLE seconds, so that a service that exits right after it was
  started is caught), every `PERSONALITY_HEALTHCHECK` unit, started after them, finished
  successfully, and in manual mode `Confirm` came;
- `Failed`: the first unit that failed (`nginx.service: exit-code`), or `deadline`;
- `Requested`: an explicit Rollback ended the trial (the manager makes that change).

Without a service manager (a sandbox root) there are no units to judge: only the deadline
and, in manual mode, Confirm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters.systemd import ServiceManager
from personalityd.core.errors import PersonalityError
from personalityd.core.history import TrialRecord

log = structlog.get_logger()

SETTLE = 1.0  # seconds every service must stay active once everything looks good
POLL = 0.05  # seconds between looks at the units' states
DEADLINE = "deadline"
BY_REQUEST = "rolled back by request"


@dataclass(frozen=True)
class Confirmed:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Requested:
    job: object  # the manager's Rollback job


@dataclass(frozen=True)
class Aborted:
    """The daemon stops: the trial stays recorded, and the next start rolls it back."""


Outcome = Confirmed | Failed | Requested | Aborted


class ActiveTrial:
    """The mailbox of the one trial under way: Confirm and Rollback reach it from the front
    ends while the consumer waits in `judge`."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.record: TrialRecord | None = None  # set once the trial's change is swapped in
        self.tried: frozenset[str] = frozenset()  # the desired names of the trial
        self.ending = False  # being rolled back: no Rollback request is taken any more
        self.confirmed = asyncio.Event()
        self.rollback: asyncio.Future[object] = loop.create_future()
        self.aborted = asyncio.Event()
        # None when confirmed, else the error of the rollback: what requests that wait for
        # the trial (an attach of a name being tried) are answered.
        self.outcome: asyncio.Future[PersonalityError | None] = loop.create_future()

    def confirm(self) -> None:
        self.confirmed.set()

    def abort(self) -> None:
        self.aborted.set()

    def end(self, error: PersonalityError | None) -> None:
        if not self.outcome.done():
            self.outcome.set_result(error)

    def request_rollback(self, job: object) -> bool:
        """False when the trial already ended, or is ending, a rollback's way."""
        if self.rollback.done() or self.ending:
            return False
        self.rollback.set_result(job)
        return True


async def judge(
    trial: ActiveTrial,
    services: ServiceManager | None,
    units: Sequence[str],
    healthchecks: Sequence[str],
    started: asyncio.Future[bool],
) -> Outcome:
    """Wait for the outcome of `trial` (its record set); `started` is done once the services
    of the change were started (stack/follower.py)."""
    assert trial.record is not None
    remaining = trial.record.deadline_usec / 1_000_000 - time.time()
    checks: asyncio.Future[object] = asyncio.ensure_future(
        _checks(trial, services, tuple(units), tuple(healthchecks), started)
    )
    aborted: asyncio.Future[object] = asyncio.ensure_future(trial.aborted.wait())
    try:
        waiting: set[asyncio.Future[object]] = {checks, trial.rollback, aborted}
        done, _ = await asyncio.wait(
            waiting, timeout=max(remaining, 0.0),
            return_when=asyncio.FIRST_COMPLETED,
        )  # fmt: skip
    finally:
        for task in (checks, aborted):
            if not task.done():
                task.cancel()
    if trial.rollback in done:
        return Requested(trial.rollback.result())
    if aborted in done:
        return Aborted()
    if checks in done:
        outcome = checks.result()
        assert isinstance(outcome, Confirmed | Failed)
        return outcome
    return Failed(DEADLINE)


async def _checks(
    trial: ActiveTrial,
    services: ServiceManager | None,
    units: tuple[str, ...],
    healthchecks: tuple[str, ...],
    started: asyncio.Future[bool],
) -> Outcome:
    await asyncio.shield(started)
    if services is not None:
        failure = await _until_active(services, units)
        if failure is None:
            failure = await _healthchecks(services, healthchecks)
        if failure is None:
            failure = await _watch(services, units, SETTLE)
        if failure is not None:
            return Failed(failure)
    if trial.record is not None and trial.record.manual:
        while not trial.confirmed.is_set():
            if services is None:
                await trial.confirmed.wait()
                break
            failure = await _watch(services, units, POLL * 4)
            if failure is not None:
                return Failed(failure)
    return Confirmed()


async def _until_active(services: ServiceManager, units: tuple[str, ...]) -> str | None:
    """Wait until every unit is up; the first failure (`unit: result`) if one fails."""
    waiting = list(units)
    while waiting:
        still = []
        for unit in waiting:
            state, result = await services.unit_status(unit)
            if _failed(state, result):
                return f"{unit}: {result or state}"
            if not _up(state, result):
                still.append(unit)
        waiting = still
        if waiting:
            await asyncio.sleep(POLL)
    return None


async def _healthchecks(services: ServiceManager, units: tuple[str, ...]) -> str | None:
    for unit in units:
        try:
            job = await services.start(unit)
        except Exception as exc:
            return f"{unit}: {exc}"
        state, result = await services.unit_status(unit)
        log.info("healthcheck_finished", unit=unit, job=job, state=state, result=result)
        if job != "done" or _failed(state, result):
            return f"{unit}: {result if result and result != 'success' else job}"
    return None


async def _watch(services: ServiceManager, units: tuple[str, ...], seconds: float) -> str | None:
    """The first unit that stops being up within `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        for unit in units:
            state, result = await services.unit_status(unit)
            if not _up(state, result):
                return f"{unit}: {result if result and result != 'success' else state}"
        if loop.time() >= end:
            return None
        await asyncio.sleep(POLL)


def _up(state: str, result: str) -> bool:
    # A oneshot service without RemainAfterExit is inactive once it has done its work.
    return state in ("active", "reloading") or (state == "inactive" and result == "success")


def _failed(state: str, result: str) -> bool:
    return state == "failed" or (state == "inactive" and result not in ("", "success"))
