"""The real daemon's D-Bus signals, seen by a second connection: for calls, spool requests and
udev events alike (docs/dbus.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus
from served_daemon import Images, Serve, Trio, no_traceback, read

from testkit.contract import BUS, IFACE, PATH
from testkit.daemon import Daemon
from testkit.dbus import Signals, call_ok, get_property
from testkit.loops import LoopDevices

# -- signals seen by a second connection ----------------------------------------------------------


def signal_bodies(signals: Signals) -> list[tuple[str, list[Any]]]:
    """(member, body) of everything received, PropertiesChanged reduced to its changes."""
    seen = []
    for msg in signals.received:
        if msg.member == "PropertiesChanged":
            assert msg.body[0] == IFACE, msg.body
            seen.append(("PropertiesChanged", [{k: v.value for k, v in msg.body[1].items()}]))
        else:
            seen.append((str(msg.member), list(msg.body)))
    return seen


def is_signal(member: str, body: Sequence[Any] | None = None) -> Callable[[Message], bool]:
    return lambda msg: msg.member == member and (body is None or list(msg.body) == list(body))


def changes(msg: Message) -> dict[str, Any]:
    """The changed properties of a PropertiesChanged, but `Present` (which moves with the
    volumes present, not with the stack; tests/integration/test_image_files.py checks it)."""
    return {k: v.value for k, v in msg.body[1].items() if k != "Present"}


async def test_signals_on_attach_detach_and_switch(
    serve: Serve,
    daemon: Daemon,
    trio: Trio,
    client: MessageBus,
    watcher: MessageBus,
) -> None:
    serve(daemon)
    async with Signals(watcher, sender=BUS, path=PATH) as signals:
        await call_ok(client, "Attach", "sa{sv}", "web", {})
        await signals.wait_for(is_signal("StackChanged", [1, ["web"]]))
        await signals.wait_for(is_signal("PersonalityAttached", ["web"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {"Attached": ["web"], "Desired": ["web"], "Generation": 1}

        await call_ok(client, "Switch", "asa{sv}", ["tools"], {})
        await signals.wait_for(is_signal("StackChanged", [2, ["tools"]]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {"Attached": ["tools"], "Desired": ["tools"], "Generation": 2}

        await call_ok(client, "Detach", "sa{sv}", "tools", {})
        await signals.wait_for(is_signal("StackChanged", [3, []]))
        await signals.wait_for(is_signal("PersonalityDetached", ["tools"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {"Attached": [], "Desired": [], "Generation": 3}

        # Nothing to do: no signal at all.
        await call_ok(client, "Detach", "sa{sv}", "tools", {})
        await call_ok(client, "Attach", "sa{sv}", "web", {})
        await signals.wait_for(is_signal("StackChanged", [4, ["web"]]))
        await signals.wait_for(is_signal("PropertiesChanged"))

    assert signal_bodies(signals) == [
        ("StackChanged", [1, ["web"]]),
        ("PersonalityAttached", ["web"]),
        ("PropertiesChanged", [{"Attached": ["web"], "Desired": ["web"], "Generation": 1}]),
        ("StackChanged", [2, ["tools"]]),
        ("PersonalityDetached", ["web"]),
        ("PersonalityAttached", ["tools"]),
        ("PropertiesChanged", [{"Attached": ["tools"], "Desired": ["tools"], "Generation": 2}]),
        ("StackChanged", [3, []]),
        ("PersonalityDetached", ["tools"]),
        ("PropertiesChanged", [{"Attached": [], "Desired": [], "Generation": 3}]),
        ("StackChanged", [4, ["web"]]),
        ("PersonalityAttached", ["web"]),
        ("PropertiesChanged", [{"Attached": ["web"], "Desired": ["web"], "Generation": 4}]),
    ]


async def test_signals_on_spool_requests_and_udev_removal(
    serve: Serve,
    daemon: Daemon,
    trio: Trio,
    client: MessageBus,
    watcher: MessageBus,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    shared = image("extra", {"usr/bin/web-tool": b"extra\n", "usr/bin/extra": b"x\n"})
    serve(daemon)
    async with Signals(watcher, sender=BUS, path=PATH) as signals:
        result = await asyncio.to_thread(
            daemon.request, {"action": "switch", "personalities": ["tools", "web"]}
        )
        assert result["status"] == "ok", result
        await signals.wait_for(is_signal("StackChanged", [1, ["tools", "web"]]))
        await signals.wait_for(is_signal("PersonalityAttached", ["tools"]))
        await signals.wait_for(is_signal("PersonalityAttached", ["web"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {
            "Attached": ["tools", "web"],
            "Desired": ["tools", "web"],
            "Generation": 1,
        }
        result = await asyncio.to_thread(
            daemon.request, {"action": "detach", "personality": "tools"}
        )
        assert result["status"] == "ok", result
        await signals.wait_for(is_signal("StackChanged", [2, ["web"]]))
        await signals.wait_for(is_signal("PersonalityDetached", ["tools"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {"Attached": ["web"], "Desired": ["web"], "Generation": 2}

        # An Attach waiting for its volume, then the volume yanked: udev drives the stack.
        pending = asyncio.create_task(
            call_ok(client, "Attach", "sa{sv}", "extra", {"timeout": Variant("u", 30)})
        )
        await asyncio.sleep(0.3)
        assert not pending.done()
        extra = await asyncio.to_thread(loop_devices.attach, shared)
        assert await asyncio.wait_for(pending, 30) == [True]
        await signals.wait_for(is_signal("StackChanged", [3, ["web", "extra"]]))
        await signals.wait_for(is_signal("PersonalityAttached", ["extra"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {
            "Attached": ["web", "extra"],
            "Desired": ["web", "extra"],
            "Generation": 3,
            "ConflictCount": 1,  # extra shadows web's usr/bin/web-tool
        }
        assert read(sandbox_root, "usr/bin/web-tool") == b"extra\n"

        await asyncio.to_thread(loop_devices.yank, extra)
        await signals.wait_for(is_signal("StackChanged", [4, ["web"]]), timeout=120)
        await signals.wait_for(is_signal("PersonalityDetached", ["extra"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        # The stack lost it; it stays desired (pending its return).
        assert changes(props) == {"Attached": ["web"], "Generation": 4, "ConflictCount": 0}
        assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"

        await asyncio.to_thread(loop_devices.yank, trio.web)
        await signals.wait_for(is_signal("StackChanged", [5, []]), timeout=120)
        await signals.wait_for(is_signal("PersonalityDetached", ["web"]))
        props = await signals.wait_for(is_signal("PropertiesChanged"))
        assert changes(props) == {"Attached": [], "Generation": 5}
    assert await get_property(client, "Desired") == ["web", "extra"]
    assert not (sandbox_root / "usr/bin/web-tool").exists()
    no_traceback(daemon)
