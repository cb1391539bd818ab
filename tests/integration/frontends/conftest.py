"""Fixtures of the D-Bus service and personalityctl tests over an in-memory manager.

| fixture | scope | gives |
|---|---|---|
| `manager` | function | a `MemoryManager` with web 2.1, tools 1.0, old (incompatible) |
| `served` | function | the service on that bus over `manager` (its own connection) |
| `client` | function | a second connection, for calls and signals |
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dbus_fast.aio import MessageBus
from memory_manager import FakeVolume, MemoryManager
from served_daemon import connection

from personalityd.adapters.groups import group_gids
from personalityd.frontends.dbus.service import serve
from testkit.contract import BUS


@pytest.fixture
def manager(personality_gid: int) -> MemoryManager:
    return MemoryManager(
        [
            FakeVolume("web", version="2.1"),
            FakeVolume("tools", version="1.0"),
            FakeVolume("old", version="0.9", incompatibility="ID=fedora, base is debian"),
        ],
        allowed_gids=group_gids(),
    )


@pytest.fixture
async def served(system_bus: str, manager: MemoryManager) -> AsyncIterator[MessageBus]:
    bus = await serve(manager, system_bus)
    try:
        yield bus
    finally:
        await bus.release_name(BUS)  # so that the next test can own it at once
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


@pytest.fixture
async def client(system_bus: str, served: MessageBus) -> AsyncIterator[MessageBus]:
    async with connection(system_bus) as bus:
        yield bus
