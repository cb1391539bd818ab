"""What follows a swap: the personalities' declarations, their services, and the units
`personality@NAME.service` that other units depend on (docs/system.md).

- Before a swap that takes personalities out of the live stack (the consumer waits for it):
  their `personality@NAME.service` is stopped, and with it every unit that requires it, then
  their `PERSONALITY_SERVICES`; the stop jobs are waited for, so nothing of theirs runs when
  their files go. The unit's own ExecStop (`personalityctl detach NAME --from-unit`) reaches
  the daemon meanwhile: it is answered at once, without the queue (`unit_stop_is_ours`).
- After the swap (the consumer waits for it too, it is quick and local): the declarations of
  the personalities that joined (sysusers.d, tmpfiles.d), and the linker's cache when one that
  joined or left ships libraries, each run with the base's own tool; a failure is journalled
  and returned (the stack stays).
- Then, in the follower's own task, never in the consumer: the service manager is reloaded,
  the joining personalities' `PERSONALITY_SERVICES` are started and their jobs awaited; only
  then are the callers of the change answered, so `personalityctl attach NAME` (the ExecStart
  of `personality@NAME.service`) returns once the services run; then `personality@NAME` is
  started for each joining NAME still stacked (a start through the unit just joins its own
  job). At start-up, after READY, the same for every stacked personality.

After a change that took personalities out, the follower also makes udevd reload (the
base's `udevadm control --reload`), so it lets go of the generation it last mapped its hwdb
from.

Without systemd (a sandbox root, no service manager) only the declarations are applied and
callers are answered right after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters.basetools import BaseTools, ToolUnavailable
from personalityd.adapters.declarations import ToolFailure, apply_runs, read_declarations
from personalityd.adapters.journal import Journal
from personalityd.adapters.systemd import ServiceManager
from personalityd.config import Config
from personalityd.core.declarations import Declarations, ToolRun, plan_runs
from personalityd.core.model import Volume
from personalityd.stack.layout import Layout, MountedVolume

log = structlog.get_logger()

UDEVADM = ("/usr/bin/udevadm", "/bin/udevadm", "/sbin/udevadm")
RUNNING_STATES = frozenset({"active", "activating", "reloading"})


def base_tools(config: Config, layout: Layout) -> BaseTools:
    """The tools of the system the daemon runs on, below the hierarchies it stacks."""
    references = {str(config.path(h)): layout.base_ref(h) for h in config.hierarchies}
    return BaseTools(references, getattr(sys.implementation, "_multiarch", ""))


def personality_unit(name: str) -> str:
    return f"personality@{name}.service"


@dataclass(frozen=True)
class _FollowUp:
    arriving: tuple[Volume, ...]  # whose services to start, then their personality@ unit
    answer: Callable[[], None]
    units_only: tuple[str, ...] = ()  # start-up: personality@ units of the restored stack
    answer_only: bool = False  # a change that stacked nothing: its answer, in turn
    released: bool = False  # personalities left the stack: udevd lets go of their generation


class Follower:
    """One per daemon; see the module docstring. `live` gives the current live stack."""

    def __init__(
        self,
        root: str,
        journal: Journal,
        tools: BaseTools,
        services: ServiceManager | None = None,
        live: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.root = root
        self.journal = journal
        self.tools = tools
        self.services = services
        self.live = live
        self._libraries: dict[str, bool] = {}  # stacked name -> ships libraries
        # Stacked name -> its PERSONALITY_SERVICES: a volume that went away has no manifest
        # left in the registry, and its services must still be stopped.
        self._services: dict[str, tuple[str, ...]] = {}
        self._stopping: set[str] = set()  # names whose personality@ unit we are stopping
        self._spared: frozenset[str] = frozenset()  # see sparing_starting_units
        self._queue: asyncio.Queue[_FollowUp] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._current: _FollowUp | None = None

    # -- before the swap (in the consumer) -------------------------------------------------

    async def before_swap(
        self,
        gone: Sequence[str],
        volumes: Mapping[str, Volume],
        mounted: Mapping[str, MountedVolume],
    ) -> None:
        loop = asyncio.get_running_loop()
        for name in gone:
            if name not in self._libraries and name in mounted:
                self._libraries[name] = await loop.run_in_executor(
                    None, self._ships_libraries, name, mounted[name].path
                )
        if self.services is None:
            return
        for name in gone:
            await self._stop_personality_unit(name)
        for name in gone:
            volume = volumes.get(name)
            units = self._services.pop(name, ())
            if volume is not None:
                units = tuple(dict.fromkeys((*units, *volume.manifest.services)))
            for unit in reversed(units):
                try:
                    result = await self.services.stop(unit)
                    log.info("service_stopped", unit=unit, personality=name, result=result)
                except Exception as exc:
                    log.error("service_stop_failed", unit=unit, personality=name, error=str(exc))

    def _ships_libraries(self, name: str, tree: str) -> bool:
        try:
            return read_declarations(name, tree, self.tools.multiarch).libraries
        except OSError:
            return True  # cannot tell (a yanked device): make the cache again anyway

    async def _stop_personality_unit(self, name: str) -> None:
        assert self.services is not None
        unit = personality_unit(name)
        try:
            state = await self.services.unit_state(unit)
        except Exception as exc:
            log.error("personality_unit_stop_failed", unit=unit, error=str(exc))
            return
        # `deactivating`: someone else stops it (systemctl stop), and its ExecStop waits for
        # the very change we are in: waiting here would wait for ourselves.
        if state not in RUNNING_STATES:
            return
        if state == "activating" and name in self._spared:
            log.info("personality_unit_left_to_fail", unit=unit, personality=name)
            return
        self._stopping.add(name)
        try:
            result = await self.services.stop(unit)
            log.info("personality_unit_stopped", unit=unit, personality=name, result=result)
        except Exception as exc:
            log.error("personality_unit_stop_failed", unit=unit, error=str(exc))
        finally:
            self._stopping.discard(name)

    @contextlib.contextmanager
    def sparing_starting_units(self, names: Collection[str]) -> Iterator[None]:
        """While a trial is rolled back: a `personality@NAME.service` of `names` that is still
        starting is not stopped before the swap. Its ExecStart waits for the trial's answer
        (the RolledBack error) and fails with it, and the units that require it fail on the
        dependency; nothing of it runs yet that the swap could pull files from under."""
        self._spared = frozenset(names)
        try:
            yield
        finally:
            self._spared = frozenset()

    async def unit_stop_is_ours(self, name: str) -> bool:
        """Whether a detach from `personality@NAME.service`'s ExecStop is to change nothing:
        the daemon itself stops that unit (NAME left the live stack), or the system is
        shutting down (the desired list is kept for the next boot)."""
        if name in self._stopping:
            return True
        if self.services is None:
            return False
        try:
            return await self.services.system_state() == "stopping"
        except Exception as exc:
            log.warning("system_state_unknown", error=str(exc))
            return False

    # -- after the swap (in the consumer) --------------------------------------------------

    async def after_swap(
        self,
        generation: int,
        arriving: Sequence[Volume],
        gone: Sequence[str],
        mounted: Mapping[str, MountedVolume],
        answer: Callable[[], None],
    ) -> list[ToolFailure]:
        """Apply the declarations, then hand the services and the answer to the follower's
        task (or answer now, without systemd). The failures, for a trial to judge."""
        self.remember(arriving)
        try:
            failures = await self.apply_declarations(generation, arriving, gone, mounted)
        except Exception:  # the swap is done: whatever happened here, callers get answers
            log.exception("declarations_crashed", generation=generation)
            failures = []
        if self.services is None:
            answer()
        else:
            self._queue.put_nowait(_FollowUp(tuple(arriving), answer, released=bool(gone)))
        return failures

    def remember(self, stacked: Sequence[Volume]) -> None:
        """The services of personalities now stacked (also those adopted at start)."""
        for volume in stacked:
            self._services[volume.name] = volume.manifest.services

    async def apply_declarations(
        self,
        generation: int,
        arriving: Sequence[Volume],
        gone: Sequence[str],
        mounted: Mapping[str, MountedVolume],
    ) -> list[ToolFailure]:
        loop = asyncio.get_running_loop()
        trees = {v.name: mounted[v.name].path for v in arriving if v.name in mounted}
        found = await loop.run_in_executor(None, self._read_all, trees)
        declared: list[Declarations] = []
        failures: list[ToolFailure] = []
        for name, outcome in found.items():
            if isinstance(outcome, OSError):
                run = ToolRun("", (), name)
                failures.append(ToolFailure(run, f"cannot read its declarations: {outcome}"))
                continue
            self._libraries[name] = outcome.libraries
            if not outcome.empty:
                declared.append(outcome)
        libraries_left = any([self._libraries.pop(name, False) for name in gone])
        runs = plan_runs(self.root, declared, libraries_left)
        if runs:
            failures += await loop.run_in_executor(None, apply_runs, self.tools, runs)
            failed = {id(f.run) for f in failures}
            for run in runs:
                if id(run) not in failed:
                    log.info(
                        "declarations_applied",
                        personality=run.personality,
                        command=run.describe(),
                        generation=generation,
                    )
        for failure in failures:
            run = failure.run
            log.error(
                "declaration_failed",
                personality=run.personality,
                tool=run.tool,
                command=run.describe(),
                reason=failure.reason,
                generation=generation,
            )
            self.journal.declaration_failed(
                run.personality, run.tool, run.describe(), failure.reason, generation
            )
        return failures

    def _read_all(self, trees: Mapping[str, str]) -> dict[str, Declarations | OSError]:
        found: dict[str, Declarations | OSError] = {}
        for name, tree in trees.items():
            try:
                found[name] = read_declarations(name, tree, self.tools.multiarch)
            except OSError as exc:
                found[name] = exc
        return found

    # -- the follower's task ---------------------------------------------------------------

    def answer_after(self, answer: Callable[[], None]) -> None:
        """Answer a change that stacked nothing new once the follow-ups queued before it are
        done: an attach of a personality being restored at boot returns after its services
        started, like the change that stacked it."""
        if self.services is None:
            answer()
        else:
            self._queue.put_nowait(_FollowUp((), answer, answer_only=True))

    def start_units(self, names: Sequence[str]) -> None:
        """At start-up (after READY): `personality@NAME.service` for the stacked `names`."""
        if self.services is not None and names:
            self._queue.put_nowait(_FollowUp((), lambda: None, tuple(names)))

    async def run(self) -> None:
        while True:
            item = self._current = await self._queue.get()
            try:
                await self._follow(item)
            except Exception:
                log.exception("follow_up_failed")
            finally:
                item.answer()  # (a second call answers nothing: futures are set once)
                self._current = None

    def flush(self) -> None:
        """The daemon stops: answer every change still waiting for its services now."""
        if self._current is not None:
            self._current.answer()
        while not self._queue.empty():
            self._queue.get_nowait().answer()

    async def _follow(self, item: _FollowUp) -> None:
        services = self.services
        assert services is not None
        if item.answer_only:
            return
        if not item.units_only:
            try:
                await services.reload()
            except Exception as exc:
                log.error("systemd_reload_failed", error=str(exc))
            if item.released:
                await asyncio.get_running_loop().run_in_executor(None, self._reload_udev)
            jobs = [(v.name, unit) for v in item.arriving for unit in v.manifest.services]
            await asyncio.gather(*(self._start_service(n, u) for n, u in jobs))
        item.answer()
        for name in item.units_only or tuple(v.name for v in item.arriving):
            if name in self.live():
                task = asyncio.create_task(self._start_personality_unit(name))
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)

    def _reload_udev(self) -> None:
        """udevd maps its hwdb and reads its rules again whenever they look changed, which
        they do after every swap: it then holds files of the generation it last handled an
        event in, and with them every volume of that generation, which stays `draining`.
        A reload makes it let go and read the current stack (the base's own udevadm)."""
        try:
            outcome = self.tools.run(UDEVADM, ("control", "--reload"))
        except ToolUnavailable as exc:
            log.warning("udev_reload_failed", error=str(exc))
            return
        if outcome.returncode != 0:
            log.warning("udev_reload_failed", status=outcome.returncode, error=outcome.output)

    async def _start_service(self, personality: str, unit: str) -> None:
        assert self.services is not None
        try:
            result = await self.services.start(unit)
        except Exception as exc:
            error = str(exc) or type(exc).__name__  # a job timeout says nothing else
            log.error("service_start_failed", unit=unit, personality=personality, error=error)
            return
        if result == "done":
            log.info("service_started", unit=unit, personality=personality, result=result)
        else:
            log.error("service_start_failed", unit=unit, personality=personality, result=result)

    async def _start_personality_unit(self, name: str) -> None:
        """Not waited for by anyone: its ExecStart asks the daemon to attach NAME (answered
        at once, NAME is stacked), and a start through the unit is this very job."""
        assert self.services is not None
        unit = personality_unit(name)
        try:
            result = await self.services.start(unit)
        except Exception as exc:
            log.error("personality_unit_start_failed", unit=unit, error=str(exc))
            return
        event = "personality_unit_started" if result == "done" else "personality_unit_start_failed"
        log.info(event, unit=unit, personality=name, result=result)
