"""Fixtures of the end-to-end D-Bus and personalityctl tests (helpers: `served_daemon`).

| fixture | scope | gives |
|---|---|---|
| `watcher` | function | a second connection, for signals |
| `trio` | function | `Trio`: the web, tools and old volumes attached as loop devices |

`system_bus`, `serve` and `client` come from tests/integration/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dbus_fast.aio import MessageBus
from served_daemon import Images, Trio, attach_trio, connection

from testkit.loops import LoopDevices


@pytest.fixture
async def watcher(system_bus: str) -> AsyncIterator[MessageBus]:
    async with connection(system_bus) as bus:
        yield bus


@pytest.fixture
def trio(loop_devices: LoopDevices, image: Images) -> Trio:
    return attach_trio(loop_devices, image)
