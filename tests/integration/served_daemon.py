"""The real daemon on a private system bus, as the tests in daemon_api/ meet it: started
there (`serve`), read back (`listing`, `read`), and the three volumes most of them use."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from bus_clients import ERR
from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from testkit.daemon import Daemon
from testkit.dbus import call_ok
from testkit.loops import LoopDevices
from testkit.polling import wait_for

ADDRESS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"
SERVING_EVENT = "event=dbus_serving"

# Errors a changing call may get in a storm of valid requests (docs/dbus.md).
DOCUMENTED_ERRORS = {
    ERR + name
    for name in (
        "NoSuchPersonality",
        "Incompatible",
        "Busy",
        "MountFailed",
        "InvalidName",
        "Timeout",
    )
}

# `image(name, files, fmt="squashfs", **kw)`, the fixture in tests/integration/conftest.py.
Images = Callable[..., Path]
# `serve(daemon)`, the fixture in daemon_api/conftest.py.
Serve = Callable[[Daemon], Daemon]


def serve_on(daemon: Daemon, address: str) -> Daemon:
    """Start `daemon` on the bus at `address`; return once it owns the bus name."""
    daemon.env[ADDRESS_ENV] = address
    before = daemon.log_text().count(SERVING_EVENT)
    # Coldplug probes every volume (a walk for set-id files): with 100,000-file volumes on
    # a loaded machine that is minutes, not seconds. The deadlines are for a hang.
    daemon.start(timeout=600)
    wait_for(
        lambda: daemon.log_text().count(SERVING_EVENT) > before or not daemon.running(),
        timeout=600,
        what=f"{daemon.name} to log {SERVING_EVENT}",
    )
    assert daemon.running(), daemon.log_text()[-4000:]
    return daemon


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


@contextlib.asynccontextmanager
async def connection(address: str) -> AsyncIterator[MessageBus]:
    """A connection to the bus at `address`, disconnected (and waited for) on the way out."""
    bus = await connect(address)
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


async def listing(bus: MessageBus) -> dict[str, tuple[str, str, str, str]]:
    """ListPersonalities as name -> (state, version, device, mount point)."""
    (rows,) = await call_ok(bus, "ListPersonalities")
    return {row[0]: tuple(row[1:]) for row in rows}


async def wait_listed(
    bus: MessageBus, name: str, state: str, timeout: float = 120
) -> tuple[str, str, str, str]:
    """Poll ListPersonalities until `name` has `state`; its row (state, version, device, mp)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await listing(bus)
        if name in rows and rows[name][0] == state:
            return rows[name]
        assert time.monotonic() < deadline, f"{name} never {state}: {rows}"
        await asyncio.sleep(0.1)


def read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def no_traceback(daemon: Daemon) -> None:
    assert daemon.running(), daemon.log_text()[-4000:]
    assert "Traceback" not in daemon.log_text()


def web_files(tag: str = "web") -> dict[str, object]:
    return {f"usr/bin/{tag}-tool": f"#!/bin/sh\necho {tag}\n", f"etc/{tag}.conf": f"{tag} = 1\n"}


@dataclass
class Trio:
    """Three volumes on loop devices: web 2.1, tools 1.0, old (incompatible, for fedora)."""

    web: str
    tools: str
    old: str


def attach_trio(loop_devices: LoopDevices, image: Images) -> Trio:
    return Trio(
        web=loop_devices.attach(
            image("web", web_files("web"), manifest={"ID": "_any", "IMAGE_VERSION": "2.1"})
        ),
        tools=loop_devices.attach(
            image(
                "tools",
                web_files("tools"),
                "erofs",
                manifest={"ID": "debian", "VERSION_ID": "12", "IMAGE_VERSION": "1.0"},
            )
        ),
        old=loop_devices.attach(
            image("old", web_files("old"), manifest={"ID": "fedora", "IMAGE_VERSION": "0.9"})
        ),
    )
