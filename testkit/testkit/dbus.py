"""D-Bus for tests: a private system bus with our policy, Manager calls, collected signals.

`private_system_bus()` starts `dbus-daemon --nofork --print-address` with a system-bus config
(`<type>system</type>`, EXTERNAL auth, the default-deny policy of Debian's system.conf) that
includes `config/org.personalityd.personality1.conf` from this repository, listens on a unix
socket in a fresh temporary directory that any user can reach (tests run clients as `nobody`),
sets `DBUS_SYSTEM_BUS_ADDRESS` for the code under test, and stops the daemon by PID at the end.

`Signals` collects the signals a second connection sees, with their arrival times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from testkit.contract import BUS, IFACE, PATH
from testkit.paths import REPO

POLICY_FILE = REPO / "config" / "org.personalityd.personality1.conf"
ADDRESS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"

# Debian 12's /usr/share/dbus-1/system.conf without user switching, forking, pid file,
# syslog, service activation and the system.d includes; plus our policy file.
_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{includes}
</busconfig>
"""


def bus_config(socket: Path, policy_files: Sequence[Path]) -> str:
    includes = "\n".join(f"  <include>{p}</include>" for p in policy_files)
    return _CONFIG.format(socket=socket, includes=includes)


def _read_address(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("dbus-daemon printed no address")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer.decode().strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def private_system_bus(
    policy_files: Sequence[Path] = (POLICY_FILE,), *, set_env: bool = True
) -> Iterator[str]:
    """A running private system bus; yields its address (also in $DBUS_SYSTEM_BUS_ADDRESS)."""
    dbus_daemon = shutil.which("dbus-daemon")
    if dbus_daemon is None:
        raise RuntimeError("dbus-daemon not found (Debian: apt install dbus-daemon)")
    tmp = Path(tempfile.mkdtemp(prefix="personalityd-bus-"))
    tmp.chmod(0o755)  # clients run as other users must reach the socket
    socket = tmp / "system_bus_socket"
    config = tmp / "system.conf"
    config.write_text(bus_config(socket, policy_files))
    log_path = tmp / "dbus-daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [dbus_daemon, f"--config-file={config}", "--nofork", "--print-address", "--nosyslog"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    saved = os.environ.get(ADDRESS_ENV)
    try:
        try:
            address = _read_address(proc, timeout=10)
        except TimeoutError:
            address = ""
        if not address:
            _stop(proc)
            raise RuntimeError(f"dbus-daemon did not start: {log_path.read_text()!r}")
        socket.chmod(0o666)  # as /run/dbus/system_bus_socket
        if set_env:
            os.environ[ADDRESS_ENV] = address
        yield address
    finally:
        if set_env:
            if saved is None:
                os.environ.pop(ADDRESS_ENV, None)
            else:
                os.environ[ADDRESS_ENV] = saved
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


class Signals:
    """Signals from one sender (and path) seen by a dbus-fast connection, in arrival order.

    `async with Signals(bus, sender=BUS_NAME, path=OBJECT_PATH) as signals:` adds the match
    rule and a message handler, removed again on exit; `await signals.wait_for(pred)` returns
    the next signal (after the one the previous wait_for returned) that satisfies `pred`.
    `arrived_at[i]` is the `time.monotonic()` at which `received[i]` was read off the bus.
    """

    def __init__(self, bus: MessageBus, *, sender: str, path: str | None = None) -> None:
        self.bus = bus
        self.rule = f"type='signal',sender='{sender}'" + (f",path='{path}'" if path else "")
        self.path = path
        self.received: list[Message] = []
        self.arrived_at: list[float] = []
        self._cursor = 0
        self._arrived = asyncio.Event()

    async def _bus_call(self, member: str) -> None:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature="s",
                body=[self.rule],
            )
        )
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and (self.path is None or msg.path == self.path):
            self.arrived_at.append(time.monotonic())
            self.received.append(msg)
            self._arrived.set()
        return False

    async def __aenter__(self) -> Signals:
        self.bus.add_message_handler(self._on_message)
        await self._bus_call("AddMatch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.bus.remove_message_handler(self._on_message)
        if self.bus.connected:
            await self._bus_call("RemoveMatch")

    def skip_received(self) -> None:
        """Let the next `wait_for` look only at signals that arrive from now on."""
        self._cursor = len(self.received)

    async def wait_stamped(
        self, predicate: Callable[[Message], bool], timeout: float = 5
    ) -> tuple[float, Message]:
        """As `wait_for`, with the signal's arrival time (`time.monotonic()`)."""
        async with asyncio.timeout(timeout):
            while True:
                for index in range(self._cursor, len(self.received)):
                    if predicate(self.received[index]):
                        self._cursor = index + 1
                        return self.arrived_at[index], self.received[index]
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 5) -> Message:
        _, msg = await self.wait_stamped(predicate, timeout)
        return msg


# -- calling the Manager interface ------------------------------------------------------------
CALL_TIMEOUT = 60.0


def manager_message(member: str, signature: str = "", *body: Any) -> Message:
    """A method call message for the Manager interface of the daemon's object."""
    return Message(
        destination=BUS,
        path=PATH,
        interface=IFACE,
        member=member,
        signature=signature,
        body=list(body),
    )


async def call(bus: MessageBus, member: str, signature: str = "", *body: Any) -> Message:
    """A method call on the Manager interface; the reply (return or error) as it came."""
    return await asyncio.wait_for(bus.call(manager_message(member, signature, *body)), CALL_TIMEOUT)


async def call_ok(bus: MessageBus, member: str, signature: str = "", *body: Any) -> list[Any]:
    reply = await call(bus, member, signature, *body)
    assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


async def call_error(
    bus: MessageBus, member: str, signature: str = "", *body: Any
) -> tuple[str, str]:
    """(error name, message) of a call that must fail."""
    reply = await call(bus, member, signature, *body)
    assert reply.message_type is MessageType.ERROR, (member, body, reply.body)
    return str(reply.error_name), str(reply.body[0])


async def _properties(bus: MessageBus, member: str, signature: str, body: list[Any]) -> Any:
    msg = Message(
        destination=BUS,
        path=PATH,
        interface="org.freedesktop.DBus.Properties",
        member=member,
        signature=signature,
        body=body,
    )
    reply = await asyncio.wait_for(bus.call(msg), CALL_TIMEOUT)
    assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    return reply.body[0]


async def get_property(bus: MessageBus, name: str) -> Any:
    return (await _properties(bus, "Get", "ss", [IFACE, name])).value


async def get_all(bus: MessageBus) -> dict[str, Any]:
    return {k: v.value for k, v in (await _properties(bus, "GetAll", "s", [IFACE])).items()}


def parse_introspect(text: str) -> dict[str, tuple[str, str, str, str]]:
    """`busctl introspect` lines of our interface: member -> (type, signature, result, flags)."""
    members = {}
    inside = False
    for line in text.splitlines():
        fields = line.split(None, 4)
        if len(fields) >= 2 and fields[1] == "interface":
            inside = fields[0] == IFACE
            continue
        if inside and fields and fields[0].startswith("."):
            flags = fields[4] if len(fields) > 4 else "-"
            members[fields[0][1:]] = (fields[1], fields[2], fields[3], flags)
    return members
