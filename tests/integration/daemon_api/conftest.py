"""Fixtures of the end-to-end D-Bus and personalityctl tests (helpers: `served_daemon`).

| fixture | scope | gives |
|---|---|---|
| `system_bus` | module | address of a private dbus-daemon with the system bus policy and ours |
| `serve` | function | `serve(daemon)`: the daemon started on that bus, once it owns the name |
| `client` | function | a dbus-fast connection to the bus, for calls |
| `watcher` | function | a second connection, for signals |
| `trio` | function | `Trio`: the web, tools and old volumes attached as loop devices |
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from dbus_fast.aio import MessageBus
from served_daemon import Images, Serve, Trio, attach_trio, connect, serve_on

from testkit.daemon import Daemon
from testkit.dbus import private_system_bus
from testkit.loops import LoopDevices


@pytest.fixture(scope="module")
def system_bus() -> Iterator[str]:
    with private_system_bus() as address:
        yield address


@pytest.fixture
def serve(system_bus: str) -> Serve:
    def start(daemon: Daemon) -> Daemon:
        return serve_on(daemon, system_bus)

    return start


@pytest.fixture
async def client(system_bus: str) -> AsyncIterator[MessageBus]:
    bus = await connect(system_bus)
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


@pytest.fixture
async def watcher(system_bus: str) -> AsyncIterator[MessageBus]:
    bus = await connect(system_bus)
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


@pytest.fixture
def trio(loop_devices: LoopDevices, image: Images) -> Trio:
    return attach_trio(loop_devices, image)
