"""The spool front end: request files in, manager calls, result files out.

Each request is handled in its own task, so one waiting for a volume (its `timeout`) does not
hold up the others; tasks reach the manager's queue in the order the files were found. The
caller is the request file's owner with that owner's groups; the manager decides whether they
may change the stack. A request file stays in the spool until its result is written, so one
interrupted by a crash is handled again at the next start; one that was handled is never
handled again, even when its result could not be written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from personalityd.adapters.groups import lookup_user_gids
from personalityd.adapters.spool import (
    RequestGone,
    finish_request,
    read_request,
    result_body,
    set_aside,
    watch,
)
from personalityd.config import Config
from personalityd.core.access import SPOOL, Caller
from personalityd.core.errors import PersonalityError, Stopping
from personalityd.core.requests import Request, parse_request, request_id_of
from personalityd.log import CallerLog
from personalityd.stack.api import ManagerAPI

log = structlog.get_logger()
refusals = CallerLog(__name__)


class SpoolService:
    def __init__(self, config: Config, manager: ManagerAPI) -> None:
        self.config = config
        self.manager = manager
        self.spool = config.spool_path

    async def run(self) -> None:
        in_flight: set[Path] = set()
        async with asyncio.TaskGroup() as tasks:
            async for path in watch(self.spool):
                if path in in_flight:
                    continue
                in_flight.add(path)
                tasks.create_task(self._handle(path, in_flight))

    async def _handle(self, path: Path, in_flight: set[Path]) -> None:
        body: bytes | None = None
        owner: int | None = None
        try:
            request_file = read_request(path)
            body, owner = request_file.body, request_file.owner
            request = parse_request(body)
            caller = await self._caller(path, request_file.owner)
            changed = await self._execute(request, caller, path)
            result = result_body(
                request.id, None, changed, self.manager.attached, self.manager.generation
            )
            ok = True
        except RequestGone:
            in_flight.discard(path)
            return  # taken away before we got to it, or a duplicate notice: nothing to answer
        except Stopping:
            in_flight.discard(path)
            return  # the daemon is stopping: the request stays in the spool for the next start
        except PersonalityError as error:
            request_id = request_id_of(body) if body is not None else None
            result = result_body(
                request_id, error, False, self.manager.attached, self.manager.generation
            )
            ok = False
            refusals.warning(owner, "spool_request_refused", file=path.name, code=error.code,
                             reason=str(error))  # fmt: skip
        try:
            # In a worker thread: the result's fsync must not hold up the event loop.
            await asyncio.get_running_loop().run_in_executor(
                None, finish_request, self.spool, path, ok, result
            )
        except OSError as exc:
            # Answered but not filed: set aside, so it is not run again after a restart.
            kept = set_aside(self.spool, path)
            log.error("spool_result_not_written", file=path.name, error=str(exc),
                      set_aside=str(kept) if kept else None)  # fmt: skip
        finally:
            in_flight.discard(path)

    @staticmethod
    async def _caller(path: Path, owner: int) -> Caller:
        # Root's groups are looked up too: every request makes the same lookups, so they
        # reach the manager's queue in the order the files were found.
        gids = await lookup_user_gids(owner)
        return Caller(
            owner, gids, f"spool file {path.name} (uid {owner})", front_end=SPOOL,
            origin=path.name,
        )  # fmt: skip

    async def _execute(self, request: Request, caller: Caller, path: Path) -> bool:
        log.info("spool_request", file=path.name, caller=caller.description,
                 action=request.action, names=request.names)  # fmt: skip
        trial = request.trial
        if request.action == "attach":
            return await self.manager.attach(
                caller, request.names[0], timeout=request.timeout, force=request.force,
                trial=trial,
            )  # fmt: skip
        if request.action == "detach":
            return await self.manager.detach(caller, request.names[0], trial=trial)
        if request.action == "rollback":
            before = self.manager.generation
            after = await self.manager.rollback(
                caller, request.generation, timeout=request.timeout, force=request.force,
                trial=trial, data=request.data,
            )  # fmt: skip
            return after != before
        return await self.manager.switch(
            caller, request.names, timeout=request.timeout, force=request.force, trial=trial
        )
