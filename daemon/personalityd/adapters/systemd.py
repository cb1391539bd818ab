"""The service manager, over D-Bus: reload after a stack change, start and stop the units a
personality lists in PERSONALITY_SERVICES. Used only on a systemd host with root = "/".
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from personalityd.core.model import Volume

log = structlog.get_logger()

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
JOB_TIMEOUT = 90.0
# JobRemoved can be read in the same batch as the StartUnit/StopUnit reply, before the caller
# has the job path to wait for; results of jobs nobody waits for (yet) are kept this long.
FINISHED_JOBS_KEPT = 256


@dataclass
class ServiceHooks:
    """Called around swaps on a systemd host (see connect_service_hooks); no-ops elsewhere."""

    before_swap: Callable[[Sequence[Volume]], object] | None = None
    after_change: Callable[[Sequence[Volume]], object] | None = None


class ServiceManager:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()
        bus.add_message_handler(self._on_message)

    async def subscribe(self) -> None:
        await self._call("Subscribe", "", [])
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[
                    f"type='signal',sender='{SYSTEMD}',interface='{SYSTEMD_MANAGER}',"
                    "member='JobRemoved'"
                ],
            )
        )

    def _on_message(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.member == "JobRemoved":
            _job_id, job_path, _unit, result = message.body
            future = self._jobs.pop(job_path, None)
            if future is not None:
                if not future.done():
                    future.set_result(result)
                return
            self._finished[job_path] = result
            while len(self._finished) > FINISHED_JOBS_KEPT:
                self._finished.popitem(last=False)

    async def _call(self, member: str, signature: str, body: list[object]) -> Message:
        reply = await self.bus.call(
            Message(
                destination=SYSTEMD,
                path=SYSTEMD_PATH,
                interface=SYSTEMD_MANAGER,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            name = reply.error_name if reply is not None else ""
            raise RuntimeError(f"systemd {member} failed: {name}: {detail}")
        return reply

    async def reload(self) -> None:
        await self._call("Reload", "", [])

    async def _run_job(self, member: str, unit: str) -> str:
        loop = asyncio.get_running_loop()
        reply = await self._call(member, "ss", [unit, "replace"])
        job_path = str(reply.body[0])
        finished = self._finished.pop(job_path, None)
        if finished is not None:  # the job ended before we got here
            return finished
        future = self._jobs.setdefault(job_path, loop.create_future())
        try:
            return await asyncio.wait_for(future, JOB_TIMEOUT)
        finally:
            self._jobs.pop(job_path, None)

    async def start(self, unit: str) -> str:
        return await self._run_job("StartUnit", unit)

    async def stop(self, unit: str) -> str:
        return await self._run_job("StopUnit", unit)


async def connect_service_hooks() -> ServiceHooks:
    """Hooks for the manager; without a reachable systemd, hooks that do nothing."""
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        manager = ServiceManager(bus)
        await manager.subscribe()
    except Exception as exc:
        log.warning("systemd_unavailable", error=str(exc))
        return ServiceHooks()

    async def before_swap(leaving: Sequence[Volume]) -> None:
        for volume in leaving:
            for unit in reversed(volume.manifest.services):
                try:
                    result = await manager.stop(unit)
                    log.info("service_stopped", unit=unit, personality=volume.name, result=result)
                except Exception as exc:
                    log.error("service_stop_failed", unit=unit, error=str(exc))

    starting: set[asyncio.Task[None]] = set()

    async def start_and_log(unit: str, personality: str) -> None:
        try:
            result = await manager.start(unit)
            log.info("service_started", unit=unit, personality=personality, result=result)
        except Exception as exc:
            log.error("service_start_failed", unit=unit, error=str(exc))

    async def after_change(arriving: Sequence[Volume]) -> None:
        try:
            await manager.reload()
        except Exception as exc:
            log.error("systemd_reload_failed", error=str(exc))
        # Start jobs are queued, not awaited: a unit ordered After=personalityd.service waits
        # for our READY, and the first stack is restored before READY; the consumer must not
        # wait on it (stops before a swap, in contrast, are awaited: the files must stay).
        for volume in arriving:
            for unit in volume.manifest.services:
                task = asyncio.create_task(start_and_log(unit, volume.name))
                starting.add(task)
                task.add_done_callback(starting.discard)

    return ServiceHooks(before_swap=before_swap, after_change=after_change)
