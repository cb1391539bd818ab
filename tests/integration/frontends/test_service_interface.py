"""The D-Bus interface (docs/dbus.md) on a private system bus, over an in-memory manager:
its shape, methods, properties and signals, and that a long call does not hold up the others.

What a client observes is checked with the clients users have: `busctl`, `gdbus`, and a second
dbus-fast connection for signals. The names are spelled out from the API, not imported, so
that the code cannot drift from the contract unnoticed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bus_clients import ERR, arun, busctl, busctl_call
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from memory_manager import FakeVolume, MemoryManager

from personalityd.core.model import Conflict
from testkit.contract import BUS, IFACE, PATH
from testkit.dbus import Signals, call_error, call_ok, get_property, parse_introspect

# -- shape of the interface ---------------------------------------------------------------------


async def test_introspection_shows_every_member_with_its_signature(
    system_bus: str, served: MessageBus
) -> None:
    result = await arun(*busctl(system_bus, "introspect", BUS, PATH))
    assert result.rc == 0, result.err
    members = parse_introspect(result.out)
    expected = {
        "ListPersonalities": ("method", "-", "a(sssss)"),
        "Attach": ("method", "sa{sv}", "b"),
        "Detach": ("method", "sa{sv}", "b"),
        "Switch": ("method", "asa{sv}", "b"),
        "ListConflicts": ("method", "-", "a(ssasb)"),
        "Refresh": ("method", "-", "-"),
        "Rollback": ("method", "ta{sv}", "t"),
        "Confirm": ("method", "t", "-"),
        "ListGenerations": ("method", "-", "a(tastss)"),
        "Attached": ("property", "as", None),
        "Desired": ("property", "as", None),
        "Generation": ("property", "t", None),
        "ConflictCount": ("property", "u", None),
        "WritableDevice": ("property", "s", None),
        "Present": ("property", "as", None),
        "Notices": ("property", "as", None),
        "StackChanged": ("signal", "tas", "-"),
        "PersonalityAttached": ("signal", "s", "-"),
        "PersonalityDetached": ("signal", "s", "-"),
    }
    assert set(members) == set(expected)
    for name, (kind, signature, out) in expected.items():
        assert members[name][:2] == (kind, signature), name
        if out is not None:
            assert members[name][2] == out, name
        if kind == "property":
            assert "writable" not in members[name][3], name
            assert "emits-change" in members[name][3], name


async def test_introspection_through_dbus_fast(client: MessageBus) -> None:
    node = await client.introspect(BUS, PATH)
    (interface,) = [i for i in node.interfaces if i.name == IFACE]
    signals = {s.name: s.signature for s in interface.signals}
    assert signals == {
        "StackChanged": "tas",
        "PersonalityAttached": "s",
        "PersonalityDetached": "s",
    }
    methods = {m.name: (m.in_signature, m.out_signature) for m in interface.methods}
    assert methods["Switch"] == ("asa{sv}", "b")


# -- methods --------------------------------------------------------------------------------------


async def test_list_personalities_with_busctl_json(system_bus: str, served: MessageBus) -> None:
    result = await arun(
        *busctl(system_bus, "--json=short", "call", BUS, PATH, IFACE, "ListPersonalities")
    )
    assert result.rc == 0, result.err
    reply = json.loads(result.out)
    assert reply["type"] == "a(sssss)"
    assert reply["data"] == [
        [
            ["old", "incompatible", "0.9", "/dev/loop12", ""],
            ["tools", "available", "1.0", "/dev/loop11", ""],
            ["web", "available", "2.1", "/dev/loop10", ""],
        ]
    ]


async def test_attach_and_detach_with_busctl_are_idempotent(
    system_bus: str, served: MessageBus, manager: MemoryManager
) -> None:
    first = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0"))
    assert (first.rc, first.out.strip()) == (0, "b true"), first.err
    again = await arun(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "1", "force", "b", "false")
    )
    assert (again.rc, again.out.strip()) == (0, "b false"), again.err
    assert manager.attached == ("web",)

    json_result = await arun(
        "busctl", f"--address={system_bus}", "--json=short", "call", BUS, PATH, IFACE,
        "Detach", "sa{sv}", "web", "0",
    )  # fmt: skip
    assert json_result.rc == 0, json_result.err
    assert json.loads(json_result.out) == {"type": "b", "data": [True]}
    detached_again = await arun(*busctl_call(system_bus, "Detach", "sa{sv}", "web", "0"))
    assert detached_again.out.strip() == "b false"
    assert not manager.attached


async def test_switch_refresh_and_properties_through_dbus_fast(
    client: MessageBus, manager: MemoryManager
) -> None:
    assert await call_ok(client, "Switch", "asa{sv}", ["tools", "web"], {}) == [True]
    assert await call_ok(client, "Switch", "asa{sv}", ["tools", "web"], {}) == [False]
    assert await get_property(client, "Attached") == ["tools", "web"]
    assert await get_property(client, "Desired") == ["tools", "web"]
    assert await get_property(client, "Generation") == 1
    assert await call_ok(client, "Refresh") == []
    assert manager.callers[-1][0] == "refresh"
    assert await call_ok(client, "Switch", "asa{sv}", [], {}) == [True]
    assert await get_property(client, "Attached") == []
    assert await get_property(client, "Generation") == 2
    assert await get_property(client, "WritableDevice") == "/dev/vdb"
    assert await get_property(client, "ConflictCount") == 0


async def test_list_conflicts(system_bus: str, client: MessageBus, manager: MemoryManager) -> None:
    manager.set_conflicts(
        [
            Conflict("/usr/bin/tool", "/usr", "web", ("tools", "old"), False),
            Conflict("/etc/motd", "/etc", "web", ("tools",), True),
        ]
    )
    rows = await call_ok(client, "ListConflicts")
    assert rows == [
        [("/usr/bin/tool", "web", ["tools", "old"], False), ("/etc/motd", "web", ["tools"], True)]
    ]
    assert await get_property(client, "ConflictCount") == 2
    result = await arun(
        "busctl", f"--address={system_bus}", "--json=short", "call", BUS, PATH, IFACE,
        "ListConflicts",
    )  # fmt: skip
    assert json.loads(result.out)["type"] == "a(ssasb)"


async def test_properties_with_busctl_get_property(system_bus: str, client: MessageBus) -> None:
    await call_ok(client, "Attach", "sa{sv}", "web", {})
    result = await arun(
        *busctl(
            system_bus, "get-property", BUS, PATH, IFACE,
            "Attached", "Desired", "Generation", "ConflictCount", "WritableDevice",
        )
    )  # fmt: skip
    assert result.rc == 0, result.err
    assert result.out.splitlines() == ['as 1 "web"', 'as 1 "web"', "t 1", "u 0", 's "/dev/vdb"']


async def test_properties_are_read_only(system_bus: str, served: MessageBus) -> None:
    result = await arun(
        *busctl(system_bus, "set-property", BUS, PATH, IFACE, "Generation", "t", "7")
    )
    assert result.rc != 0


# -- signals --------------------------------------------------------------------------------------


async def test_signals_for_stack_changes(client: MessageBus, manager: MemoryManager) -> None:
    async with Signals(client, sender=BUS, path=PATH) as signals:
        await call_ok(client, "Switch", "asa{sv}", ["tools", "web"], {})
        await signals.wait_for(lambda s: s.member == "PersonalityAttached" and s.body == ["web"])
        await signals.wait_for(lambda s: s.member == "PropertiesChanged")
        await call_ok(client, "Detach", "sa{sv}", "tools", {})
        await signals.wait_for(lambda s: s.member == "PersonalityDetached")
        await signals.wait_for(lambda s: s.member == "PropertiesChanged")

    by_member: dict[str, list[list[Any]]] = {}
    for msg in signals.received:
        by_member.setdefault(str(msg.member), []).append(msg.body)
    assert by_member["StackChanged"] == [[1, ["tools", "web"]], [2, ["web"]]]
    assert by_member["PersonalityAttached"] == [["tools"], ["web"]]
    assert by_member["PersonalityDetached"] == [["tools"]]

    changes = [body for body in by_member["PropertiesChanged"] if body[0] == IFACE]
    first = {k: v.value for k, v in changes[0][1].items()}
    assert first == {"Attached": ["tools", "web"], "Desired": ["tools", "web"], "Generation": 1}
    second = {k: v.value for k, v in changes[1][1].items()}
    assert second == {"Attached": ["web"], "Desired": ["web"], "Generation": 2}
    # StackChanged comes before the PropertiesChanged of the same change.
    members = [m.member for m in signals.received]
    assert members.index("StackChanged") < members.index("PropertiesChanged")


async def test_desired_change_without_stack_change_emits_properties_changed(
    client: MessageBus, manager: MemoryManager
) -> None:
    manager.volumes["old"].incompatibility = ""  # compatible now, then taken away while desired
    await call_ok(client, "Attach", "sa{sv}", "old", {})
    manager.remove_volume("old")  # the live stack loses it: a StackEvent, Desired unchanged
    async with Signals(client, sender=BUS, path=PATH) as signals:
        await call_ok(client, "Detach", "sa{sv}", "old", {})  # Desired changes, the stack does not
        changed = await signals.wait_for(lambda s: s.member == "PropertiesChanged")
    assert {k: v.value for k, v in changed.body[1].items()} == {"Desired": []}
    assert not [s for s in signals.received if s.member == "StackChanged"]


async def test_manager_events_from_outside_dbus_are_signalled(
    client: MessageBus, manager: MemoryManager
) -> None:
    await call_ok(client, "Attach", "sa{sv}", "web", {})
    async with Signals(client, sender=BUS, path=PATH) as signals:
        manager.remove_volume("web")  # as a udev `remove` would
        stack = await signals.wait_for(lambda s: s.member == "StackChanged")
        await signals.wait_for(lambda s: s.member == "PersonalityDetached")
    assert stack.body == [2, []]


# -- long calls do not block the bus ------------------------------------------------------------


async def test_attach_waiting_for_a_volume_does_not_block_other_calls(
    client: MessageBus, manager: MemoryManager
) -> None:
    # Only the volume ends the wait (long before its timeout): the other calls are answered
    # while the Attach is still pending, however long they take.
    pending = asyncio.create_task(
        call_ok(client, "Attach", "sa{sv}", "late", {"timeout": Variant("u", 600)})
    )
    await manager.wait_for_callers(1)
    rows = await call_ok(client, "ListPersonalities")
    assert "late" not in [row[0] for row in rows[0]]
    assert await get_property(client, "Attached") == []
    assert not pending.done()
    manager.add_volume(FakeVolume("late", version="3"))
    assert await asyncio.wait_for(pending, 120) == [True]
    assert await get_property(client, "Attached") == ["late"]


async def test_attach_timeout(client: MessageBus) -> None:
    name, _ = await call_error(client, "Attach", "sa{sv}", "never", {"timeout": Variant("u", 1)})
    assert name == ERR + "Timeout"
