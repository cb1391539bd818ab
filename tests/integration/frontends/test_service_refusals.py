"""What the D-Bus service refuses, over an in-memory manager: domain errors and malformed calls,
callers who may not change the stack (told apart by their credentials, also without a bus), and
serve() failing loudly when it cannot serve."""

from __future__ import annotations

import asyncio
import grp
import os
from typing import Any

import pytest
import structlog
from bus_clients import (
    ACCESS_DENIED,
    ERR,
    FAILED,
    INVALID_ARGS,
    NOBODY,
    arun,
    busctl,
    busctl_call,
    gdbus_call,
)
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from memory_manager import EXPLODING_NAME, SECRET_TEXT, FakeVolume, MemoryManager

from personalityd.frontends.dbus import service
from personalityd.frontends.dbus.credentials import caller_from_bus
from personalityd.frontends.dbus.service import ManagerInterface, ServeError, serve
from testkit.contract import BUS, IFACE, PATH
from testkit.dbus import call_error, call_ok, private_system_bus
from testkit.users import MemberUser

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
    result = await arun(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "1", "timeout", "s", "5")
    )
    assert result.rc == 1
    assert "option 'timeout' must be of D-Bus type 'u'" in result.err


async def test_unexpected_exception_gives_a_generic_error(client: MessageBus) -> None:
    with structlog.testing.capture_logs() as logs:
        name, text = await call_error(client, "Attach", "sa{sv}", EXPLODING_NAME, {})
    assert name == FAILED
    assert text == "internal error; the daemon's log has the details"
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
    prefix = NOBODY
    listing = await arun(*busctl_call(system_bus, "ListPersonalities", prefix=prefix))
    assert listing.rc == 0, listing.err
    assert '"web"' in listing.out
    prop = await arun(
        *busctl(system_bus, "get-property", BUS, PATH, IFACE, "Generation", prefix=prefix)
    )
    assert prop.out.strip() == "t 0"
    conflicts = await arun(*busctl_call(system_bus, "ListConflicts", prefix=prefix))
    assert conflicts.rc == 0, conflicts.err

    for args in (
        ("Attach", "sa{sv}", "web", "0"),
        ("Detach", "sa{sv}", "web", "0"),
        ("Switch", "asa{sv}", "1", "web", "0"),
        ("Refresh",),
    ):
        result = await arun(*busctl_call(system_bus, *args, prefix=prefix))
        assert result.rc == 1, args
        assert "Access denied" in result.err, (args, result.err)

    # gdbus shows the error name and the daemon's message.
    result = await arun(*gdbus_call(system_bus, "Attach", "web", "{}", prefix=prefix))
    assert result.rc == 1
    assert (
        f"{ACCESS_DENIED}: Attach is only allowed for root and members of the group" in result.err
    )
    # The D-Bus layer passed on who asked (uid and real groups); the manager's one rule
    # refused every call, and nothing changed.
    assert len(manager.callers) == 5
    assert {caller.uid for _, caller in manager.callers} == {65534}
    assert not manager.attached


async def test_personality_group_member_may_change(
    system_bus: str, served: MessageBus, manager: MemoryManager, member_user: MemberUser
) -> None:
    personality_gid = grp.getgrnam("personality").gr_gid
    result = await arun(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=member_user.setpriv)
    )
    assert (result.rc, result.out.strip()) == (0, "b true"), result.err
    operation, caller = manager.callers[-1]
    assert operation == "attach"
    assert caller.uid == member_user.uid
    assert personality_gid in caller.gids
    assert f"(uid {member_user.uid}, pid " in caller.description
    result = await arun(*busctl_call(system_bus, "Refresh", prefix=member_user.setpriv))
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
    result = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=prefix))
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
        arun(*busctl_call(system_bus, "Refresh", prefix=NOBODY)),
        arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=member_user.setpriv)),
    )
    assert denied.rc == 1
    assert member.out.strip() == "b true", member.err
    manager.add_volume(FakeVolume("late"))
    assert await asyncio.wait_for(waiting, 120) == [True]
    first, *others = [(op, c.uid) for op, c in manager.callers]
    assert first == ("attach", 0)
    assert sorted(others) == [
        ("attach", member_user.uid),
        ("refresh", 65534),
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
        result = await arun(*busctl_call(system_bus, "ListPersonalities"))
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
    interface = ManagerInterface(manager)
    assert interface.name == IFACE
    assert {m.name for m in interface.introspect().methods} == {
        "ListPersonalities", "Attach", "Detach", "Switch", "ListConflicts", "Refresh",
        "Rollback", "Confirm", "ListGenerations",
    }  # fmt: skip
