"""The D-Bus API (DESIGN section 7) on a private system bus, over an in-memory manager.

What a client observes is checked with the clients users have: `busctl` (also as `nobody` and
as a member of the `personality` group, through `setpriv`), `gdbus` (it shows error names), and
a second dbus-fast connection for signals. The names below are spelled out from DESIGN.md, not
imported, so that the code cannot drift from the contract unnoticed.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fixture import (
    BUS,
    IFACE,
    PATH,
    Signals,
    call_error,
    call_ok,
    get_property,
    parse_introspect,
    private_system_bus,
)
from memory_manager import EXPLODING_NAME, SECRET_TEXT, FakeVolume, MemoryManager
from support import MemberUser

from personalityd.adapters.groups import personality_group_gids
from personalityd.core.model import Conflict
from personalityd.frontends.dbus import service
from personalityd.frontends.dbus.service import ManagerInterface, ServeError, caller_from_bus, serve

ERR = "org.personalityd.personality1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
FAILED = "org.freedesktop.DBus.Error.Failed"

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


async def run(*argv: str) -> Result:
    """Run a command without blocking the event loop that serves the interface."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def busctl(address: str, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, "busctl", f"--address={address}", *args]


def busctl_call(address: str, member: str, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return busctl(address, "call", BUS, PATH, IFACE, member, *args, prefix=prefix)


def gdbus_call(address: str, member: str, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [
        *prefix,
        "gdbus",
        "call",
        "--address",
        address,
        "--dest",
        BUS,
        "--object-path",
        PATH,
        "--method",
        f"{IFACE}.{member}",
        *args,
    ]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def system_bus() -> Iterator[str]:
    with private_system_bus() as address:
        yield address


@pytest.fixture
def manager(personality_gid: int) -> MemoryManager:
    return MemoryManager(
        [
            FakeVolume("web", version="2.1"),
            FakeVolume("tools", version="1.0"),
            FakeVolume("old", version="0.9", incompatibility="ID=fedora, base is debian"),
        ],
        allowed_gids=personality_group_gids(),
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
    bus = await MessageBus(bus_address=system_bus, bus_type=BusType.SYSTEM).connect()
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


# -- shape of the interface ---------------------------------------------------------------------


async def test_introspection_shows_every_member_with_its_signature(
    system_bus: str, served: MessageBus
) -> None:
    result = await run(*busctl(system_bus, "introspect", BUS, PATH))
    assert result.rc == 0, result.err
    members = parse_introspect(result.out)
    expected = {
        "ListPersonalities": ("method", "-", "a(sssss)"),
        "Attach": ("method", "sa{sv}", "b"),
        "Detach": ("method", "sa{sv}", "b"),
        "Switch": ("method", "asa{sv}", "b"),
        "ListConflicts": ("method", "-", "a(ssasb)"),
        "Refresh": ("method", "-", "-"),
        "Attached": ("property", "as", None),
        "Desired": ("property", "as", None),
        "Generation": ("property", "t", None),
        "ConflictCount": ("property", "u", None),
        "WritableDevice": ("property", "s", None),
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
    result = await run(
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
    first = await run(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0"))
    assert (first.rc, first.out.strip()) == (0, "b true"), first.err
    again = await run(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "1", "force", "b", "false")
    )
    assert (again.rc, again.out.strip()) == (0, "b false"), again.err
    assert manager.attached == ("web",)

    json_result = await run(
        "busctl", f"--address={system_bus}", "--json=short", "call", BUS, PATH, IFACE,
        "Detach", "sa{sv}", "web", "0",
    )  # fmt: skip
    assert json_result.rc == 0, json_result.err
    assert json.loads(json_result.out) == {"type": "b", "data": [True]}
    detached_again = await run(*busctl_call(system_bus, "Detach", "sa{sv}", "web", "0"))
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
    result = await run(
        "busctl", f"--address={system_bus}", "--json=short", "call", BUS, PATH, IFACE,
        "ListConflicts",
    )  # fmt: skip
    assert json.loads(result.out)["type"] == "a(ssasb)"


async def test_properties_with_busctl_get_property(system_bus: str, client: MessageBus) -> None:
    await call_ok(client, "Attach", "sa{sv}", "web", {})
    result = await run(
        *busctl(
            system_bus, "get-property", BUS, PATH, IFACE,
            "Attached", "Desired", "Generation", "ConflictCount", "WritableDevice",
        )
    )  # fmt: skip
    assert result.rc == 0, result.err
    assert result.out.splitlines() == ['as 1 "web"', 'as 1 "web"', "t 1", "u 0", 's "/dev/vdb"']


async def test_properties_are_read_only(system_bus: str, served: MessageBus) -> None:
    result = await run(
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


# -- errors ---------------------------------------------------------------------------------------


async def test_domain_errors(client: MessageBus) -> None:
    name, text = await call_error(client, "Attach", "sa{sv}", "nothere", {})
    assert (name, text) == (ERR + "NoSuchPersonality", "no personality named 'nothere'")
    name, text = await call_error(client, "Attach", "sa{sv}", "old", {})
    assert name == ERR + "Incompatible"
    assert "ID=fedora" in text
    assert await call_ok(client, "Attach", "sa{sv}", "old", {"force": Variant("b", True)}) == [True]


@pytest.mark.parametrize("bad", ["../x", "", "a" * 200, "-dash", "a/b", "x y"])
async def test_invalid_names(client: MessageBus, manager: MemoryManager, bad: str) -> None:
    for member, signature, args in (
        ("Attach", "sa{sv}", (bad, {})),
        ("Detach", "sa{sv}", (bad, {})),
        ("Switch", "asa{sv}", (["web", bad], {})),
    ):
        name, text = await call_error(client, member, signature, *args)
        assert name == ERR + "InvalidName", (member, text)
        assert "invalid personality name" in text
        assert len(text) < 300
    assert manager.callers == []


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"timeout": Variant("s", "5")}, "'timeout'"),
        ({"timeout": Variant("i", 5)}, "'timeout'"),
        ({"timeout": Variant("d", 5.0)}, "'timeout'"),
        ({"timeout": Variant("t", 5)}, "'timeout'"),
        ({"force": Variant("u", 1)}, "'force'"),
        ({"force": Variant("s", "yes")}, "'force'"),
        ({"speed": Variant("u", 1)}, "'speed'"),
    ],
)
async def test_bad_options_are_invalid_args(
    client: MessageBus, manager: MemoryManager, options: dict[str, Variant], needle: str
) -> None:
    for member, signature, first in (("Attach", "sa{sv}", "web"), ("Switch", "asa{sv}", ["web"])):
        name, text = await call_error(client, member, signature, first, options)
        assert name == INVALID_ARGS
        assert needle in text
    assert manager.callers == []


async def test_detach_takes_no_options(client: MessageBus) -> None:
    name, text = await call_error(client, "Detach", "sa{sv}", "web", {"force": Variant("b", True)})
    assert name == INVALID_ARGS
    assert "'force'" in text


async def test_switch_refuses_duplicates(client: MessageBus) -> None:
    name, text = await call_error(client, "Switch", "asa{sv}", ["web", "tools", "web"], {})
    assert name == INVALID_ARGS
    assert "'web'" in text


async def test_wrong_signature_is_invalid_args(client: MessageBus, manager: MemoryManager) -> None:
    name, text = await call_error(client, "Attach", "s", "web")
    assert (name, text) == (INVALID_ARGS, "Attach takes arguments of type 'sa{sv}', got 's'")
    name, _ = await call_error(client, "Refresh", "b", True)
    assert name == INVALID_ARGS
    name, _ = await call_error(client, "NoSuchMethod")
    assert name == "org.freedesktop.DBus.Error.UnknownMethod"
    assert manager.callers == []


async def test_bad_option_type_with_busctl(system_bus: str, served: MessageBus) -> None:
    result = await run(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "1", "timeout", "s", "5")
    )
    assert result.rc == 1
    assert "option 'timeout' must be of D-Bus type 'u'" in result.err


async def test_unexpected_exception_gives_a_generic_error(client: MessageBus) -> None:
    with structlog.testing.capture_logs() as logs:
        name, text = await call_error(client, "Attach", "sa{sv}", EXPLODING_NAME, {})
    assert name == FAILED
    assert text == "internal error: RuntimeError; see the daemon log"
    assert SECRET_TEXT not in text
    assert "Traceback" not in text
    (failure,) = [e for e in logs if e["event"] == "dbus_method_failed"]
    assert failure["method"] == "Attach"
    assert failure["log_level"] == "error"
    assert failure.get("exc_info") is True


# -- who may change the stack ---------------------------------------------------------------------


async def test_nobody_may_read_but_not_change(
    system_bus: str, served: MessageBus, manager: MemoryManager
) -> None:
    prefix = tuple(NOBODY)
    listing = await run(*busctl_call(system_bus, "ListPersonalities", prefix=prefix))
    assert listing.rc == 0, listing.err
    assert '"web"' in listing.out
    prop = await run(
        *busctl(system_bus, "get-property", BUS, PATH, IFACE, "Generation", prefix=prefix)
    )
    assert prop.out.strip() == "t 0"
    conflicts = await run(*busctl_call(system_bus, "ListConflicts", prefix=prefix))
    assert conflicts.rc == 0, conflicts.err

    for args in (
        ("Attach", "sa{sv}", "web", "0"),
        ("Detach", "sa{sv}", "web", "0"),
        ("Switch", "asa{sv}", "1", "web", "0"),
        ("Refresh",),
    ):
        result = await run(*busctl_call(system_bus, *args, prefix=prefix))
        assert result.rc == 1, args
        assert "Access denied" in result.err, (args, result.err)

    # gdbus shows the error name and the daemon's message.
    result = await run(*gdbus_call(system_bus, "Attach", "web", "{}", prefix=prefix))
    assert result.rc == 1
    assert (
        f"{ACCESS_DENIED}: Attach is only allowed for root and members of the group" in result.err
    )
    # The D-Bus layer refused before the manager was asked; nothing changed.
    assert manager.callers == []
    assert not manager.attached


async def test_personality_group_member_may_change(
    system_bus: str, served: MessageBus, manager: MemoryManager, member_user: MemberUser
) -> None:
    personality_gid = grp.getgrnam("personality").gr_gid
    result = await run(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=member_user.setpriv)
    )
    assert (result.rc, result.out.strip()) == (0, "b true"), result.err
    operation, caller = manager.callers[-1]
    assert operation == "attach"
    assert caller.uid == member_user.uid
    assert personality_gid in caller.gids
    assert f"(uid {member_user.uid}, pid " in caller.description
    result = await run(*busctl_call(system_bus, "Refresh", prefix=member_user.setpriv))
    assert result.rc == 0, result.err


async def test_member_who_dropped_the_group_may_not_change(
    system_bus: str, served: MessageBus, manager: MemoryManager, member_user: MemberUser
) -> None:
    """The check uses the connection's real groups, not the group database."""
    prefix = (
        "setpriv",
        f"--reuid={member_user.uid}",
        f"--regid={member_user.gid}",
        "--clear-groups",
    )
    result = await run(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=prefix))
    assert result.rc == 1
    assert "Access denied" in result.err


async def test_interleaved_callers_are_told_apart(
    system_bus: str,
    client: MessageBus,
    manager: MemoryManager,
    member_user: MemberUser,
) -> None:
    """A waiting root call, then calls of other users: each is judged by its own sender."""
    waiting = asyncio.create_task(
        call_ok(client, "Attach", "sa{sv}", "late", {"timeout": Variant("u", 600)})
    )
    await manager.wait_for_callers(1)
    denied, member = await asyncio.gather(
        run(*busctl_call(system_bus, "Refresh", prefix=tuple(NOBODY))),
        run(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=member_user.setpriv)),
    )
    assert denied.rc == 1
    assert member.out.strip() == "b true", member.err
    manager.add_volume(FakeVolume("late"))
    assert await asyncio.wait_for(waiting, 120) == [True]
    assert [(op, c.uid) for op, c in manager.callers] == [
        ("attach", 0),
        ("attach", member_user.uid),
    ]
    assert manager.attached == ("web", "late")


async def test_root_caller_credentials(client: MessageBus, manager: MemoryManager) -> None:
    await call_ok(client, "Attach", "sa{sv}", "web", {})
    _, caller = manager.callers[-1]
    assert caller.uid == 0
    assert caller.description.startswith(f"{client.unique_name} (uid 0, pid ")


# -- serve() --------------------------------------------------------------------------------------


async def test_serve_fails_loudly_when_the_name_is_taken(
    system_bus: str, served: MessageBus
) -> None:
    with pytest.raises(ServeError, match=r"owned by :1\.\d+ \(pid \d+\); is another personalityd"):
        await serve(MemoryManager(), system_bus)


async def test_serve_fails_loudly_without_the_policy_file() -> None:
    with (
        private_system_bus(policy_files=(), set_env=False) as address,
        pytest.raises(ServeError, match=r"cannot own the bus name .* policy file"),
    ):
        await serve(MemoryManager(), address)


async def test_serve_fails_loudly_without_a_bus(tmp_path: Any) -> None:
    with pytest.raises(ServeError, match="cannot connect to the system bus at unix:path="):
        await serve(MemoryManager(), f"unix:path={tmp_path}/nothing")


async def test_serve_uses_dbus_system_bus_address(system_bus: str, manager: MemoryManager) -> None:
    assert os.environ["DBUS_SYSTEM_BUS_ADDRESS"] == system_bus
    bus = await serve(manager)  # no address: the environment's
    try:
        result = await run(*busctl_call(system_bus, "ListPersonalities"))
        assert result.rc == 0, result.err
    finally:
        await bus.release_name(BUS)
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


# -- the caller machinery, without a bus ----------------------------------------------------------


def test_methods_refuse_when_the_caller_cannot_be_told() -> None:
    with pytest.raises(DBusError) as info:
        service._this_call("Attach", ("web", {}))
    assert info.value.type == ACCESS_DENIED


class FakeBus:
    """Answers the bus-daemon calls caller_from_bus makes, like an old dbus-daemon would."""

    def __init__(self, credentials: dict[str, Variant], unix_user: int | None = None) -> None:
        self.credentials = credentials
        self.unix_user = unix_user
        self.asked: list[str] = []

    async def call(self, msg: Message) -> Message:
        self.asked.append(str(msg.member))
        if msg.member == "GetConnectionCredentials":
            return self._reply("a{sv}", [self.credentials])
        if msg.member == "GetConnectionUnixUser" and self.unix_user is not None:
            return self._reply("u", [self.unix_user])
        return Message(
            message_type=MessageType.ERROR,
            reply_serial=1,
            error_name="org.freedesktop.DBus.Error.NameHasNoOwner",
            signature="s",
            body=["gone"],
        )

    @staticmethod
    def _reply(signature: str, body: list[Any]) -> Message:
        return Message(
            message_type=MessageType.METHOD_RETURN,
            reply_serial=1,
            signature=signature,
            body=body,
        )


def _incoming(sender: str = ":1.9") -> Message:
    return Message(
        destination=BUS, path=PATH, interface=IFACE, member="Refresh", sender=sender, serial=5
    )


async def test_credentials_without_group_ids_fall_back_to_the_group_database(
    member_user: MemberUser, personality_gid: int
) -> None:
    bus = FakeBus({"UnixUserID": Variant("u", member_user.uid)})
    caller = await caller_from_bus(bus, _incoming())  # type: ignore[arg-type]
    assert caller.uid == member_user.uid
    assert {member_user.gid, personality_gid} <= caller.gids
    assert caller.description == f":1.9 (uid {member_user.uid})"


async def test_credentials_without_uid_ask_get_connection_unix_user() -> None:
    bus = FakeBus({}, unix_user=65534)
    caller = await caller_from_bus(bus, _incoming())  # type: ignore[arg-type]
    assert caller.uid == 65534
    assert bus.asked == ["GetConnectionCredentials", "GetConnectionUnixUser"]


async def test_unknown_credentials_are_access_denied() -> None:
    from personalityd.core.errors import AccessDenied

    with pytest.raises(AccessDenied):
        await caller_from_bus(FakeBus({}), _incoming())  # type: ignore[arg-type]


def test_interface_works_with_any_manager_api() -> None:
    """ManagerInterface needs only the ManagerAPI protocol; properties read the manager."""
    manager = MemoryManager([FakeVolume("web")])
    interface = ManagerInterface(manager, allowed_groups=("personality", "wheel"))
    assert interface.name == IFACE
    assert {m.name for m in interface.introspect().methods} == {
        "ListPersonalities", "Attach", "Detach", "Switch", "ListConflicts", "Refresh",
    }  # fmt: skip
