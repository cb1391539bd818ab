"""The service manager, over D-Bus: reload, start and stop units and wait for their jobs, a
unit's state and the system's (stack/follower.py decides what to start and stop). Used only
on a systemd host with root = "/".
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import structlog
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

log = structlog.get_logger()

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
PROPERTIES = "org.freedesktop.DBus.Properties"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
# The unit types whose interface has a Result property.
UNIT_TYPE_INTERFACES = {
    kind: f"org.freedesktop.systemd1.{kind.capitalize()}"
    for kind in ("service", "socket", "mount", "swap", "timer", "path", "automount")
}
JOB_TIMEOUT = 90.0
# JobRemoved can be read in the same batch as the StartUnit/StopUnit reply, before the caller
# has the job path to wait for; results of jobs nobody waits for (yet) are kept this long.
FINISHED_JOBS_KEPT = 256


class SystemdError(RuntimeError):
    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name  # the D-Bus error name


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

    async def _call(
        self,
        member: str,
        signature: str,
        body: list[object],
        path: str = SYSTEMD_PATH,
        interface: str = SYSTEMD_MANAGER,
    ) -> Message:
        reply = await self.bus.call(
            Message(
                destination=SYSTEMD,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            name = reply.error_name if reply is not None else ""
            raise SystemdError(f"systemd {member} failed: {name}: {detail}", name or "")
        return reply

    async def unit_state(self, unit: str) -> str:
        """The unit's ActiveState (`active`, `activating`, `deactivating`, `inactive`,
        `failed`, ...); `inactive` for a unit systemd has not loaded."""
        try:
            reply = await self._call("GetUnit", "s", [unit])
        except SystemdError as exc:
            if exc.name == NO_SUCH_UNIT:
                return "inactive"
            raise
        path = str(reply.body[0])
        state = await self._call("Get", "ss", [SYSTEMD_UNIT, "ActiveState"], path, PROPERTIES)
        return str(state.body[0].value)

    async def unit_status(self, unit: str) -> tuple[str, str]:
        """(ActiveState, Result) of a unit: `("failed", "exit-code")`, `("active", "success")`;
        Result is "" for units without one (targets); `("inactive", "not-found")` for a unit
        that systemd cannot load."""
        try:
            reply = await self._call("GetUnit", "s", [unit])
        except SystemdError as exc:
            if exc.name != NO_SUCH_UNIT:
                raise
            reply = await self._call("LoadUnit", "s", [unit])
        path = str(reply.body[0])
        props = await self._call("GetAll", "s", [SYSTEMD_UNIT], path, PROPERTIES)
        values = props.body[0]
        state = str(values["ActiveState"].value)
        if str(values["LoadState"].value) in ("not-found", "bad-setting", "error", "masked"):
            return state, str(values["LoadState"].value)
        kind = unit.rpartition(".")[2]
        interface = UNIT_TYPE_INTERFACES.get(kind)
        if interface is None:
            return state, ""
        try:
            result = await self._call("Get", "ss", [interface, "Result"], path, PROPERTIES)
        except SystemdError:
            return state, ""
        return state, str(result.body[0].value)

    async def system_state(self) -> str:
        """The manager's SystemState: `stopping` once a shutdown has begun."""
        reply = await self._call(
            "Get", "ss", [SYSTEMD_MANAGER, "SystemState"], interface=PROPERTIES
        )
        return str(reply.body[0].value)

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


async def connect_service_manager() -> ServiceManager | None:
    """The service manager on the system bus, subscribed to job ends; None (logged) when
    systemd cannot be reached."""
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        manager = ServiceManager(bus)
        await manager.subscribe()
    except Exception as exc:
        log.warning("systemd_unavailable", error=str(exc))
        return None
    return manager
