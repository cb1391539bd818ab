"""What the real daemon refuses over D-Bus, and how: callers who may not change the stack,
malformed input, a call still waiting when the daemon stops. It keeps serving after each."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

from bus_clients import (
    ACCESS_DENIED,
    ERR,
    INVALID_ARGS,
    NOBODY,
    arun,
    busctl,
    busctl_call,
    busctl_json,
    gdbus_call,
)
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from served_daemon import Serve, Trio, listing, no_traceback, read

from testkit.contract import BUS, IFACE, PATH
from testkit.daemon import Daemon
from testkit.dbus import call_error, call_ok, get_property
from testkit.users import MemberUser

# -- who may change the stack ---------------------------------------------------------------------


async def test_nobody_may_read_but_not_change(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    serve(daemon)
    await call_ok(client, "Attach", "sa{sv}", "tools", {})
    generation = await get_property(client, "Generation")

    listed = await arun(*busctl_call(system_bus, "ListPersonalities", prefix=NOBODY))
    assert listed.rc == 0, listed.err
    assert f'"web" "available" "2.1" "{trio.web}" ""' in listed.out
    as_json = await arun(*NOBODY, *busctl_json(system_bus, "ListConflicts"))
    assert json.loads(as_json.out) == {"type": "a(ssasb)", "data": [[]]}, as_json.err
    props = await arun(
        *busctl(system_bus, "get-property", BUS, PATH, IFACE,
                "Attached", "Desired", "Generation", "ConflictCount", "WritableDevice",
                prefix=NOBODY)
    )  # fmt: skip
    assert props.rc == 0, props.err
    assert props.out.splitlines() == [
        'as 1 "tools"', 'as 1 "tools"', f"t {generation}", "u 0", 's ""'
    ]  # fmt: skip
    introspect = await arun(*busctl(system_bus, "introspect", BUS, PATH, prefix=NOBODY))
    assert ".Attach" in introspect.out, introspect.err

    denied: tuple[tuple[str, ...], ...] = (
        ("Attach", "sa{sv}", "web", "0"),
        ("Detach", "sa{sv}", "tools", "0"),
        ("Switch", "asa{sv}", "1", "web", "0"),
        ("Refresh",),
    )
    for args in denied:
        result = await arun(*busctl_call(system_bus, *args, prefix=NOBODY))
        assert result.rc == 1, (args, result)
        assert "Access denied" in result.err, (args, result.err)
    # gdbus shows the error name and the daemon's message.
    for member, gdbus_args in (
        ("Attach", ("web", "{}")),
        ("Detach", ("tools", "{}")),
        ("Switch", ("['web']", "{}")),
        ("Refresh", ()),
    ):
        result = await arun(*gdbus_call(system_bus, member, *gdbus_args, prefix=NOBODY))
        assert result.rc == 1, (member, result)
        assert f"{ACCESS_DENIED}: {member} is only allowed for root and members of the group" in (
            result.err
        ), result.err
    # Nothing changed, and the daemon logged who was refused.
    assert await get_property(client, "Attached") == ["tools"]
    assert await get_property(client, "Generation") == generation
    assert not (sandbox_root / "usr/bin/web-tool").exists()
    assert read(sandbox_root, "etc/tools.conf") == b"tools = 1\n"
    log = daemon.log_text()
    assert log.count("event=access_denied") == 8, log[-3000:]
    assert "(uid 65534" in log
    no_traceback(daemon)


async def test_refusals_caused_by_other_users_cannot_flood_the_log(
    serve: Serve, daemon: Daemon, system_bus: str, trio: Trio, client: MessageBus
) -> None:
    serve(daemon)
    calls = 40
    script = "; ".join(
        " ".join(busctl_call(system_bus, "Attach", "sa{sv}", "web", "0")) for _ in range(calls)
    )
    flood = await arun(*NOBODY, "sh", "-c", script + "; true")
    assert flood.err.count("Access denied") == calls, flood.err[-2000:]
    # root's own refused calls are all written
    for _ in range(15):
        await call_error(client, "Attach", "sa{sv}", "no-such-volume", {})
    log = daemon.log_text()
    denied = [line for line in log.splitlines() if "event=access_denied" in line]
    assert 1 <= len(denied) <= 10, denied
    assert all("(uid 65534" in line for line in denied)
    assert log.count("event=dbus_method_refused") == 15, log[-3000:]
    assert await get_property(client, "Attached") == []
    no_traceback(daemon)


async def test_personality_group_member_may_change(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    member_user: MemberUser,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    serve(daemon)
    as_member = member_user.setpriv
    result = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=as_member))
    assert (result.rc, result.out.strip()) == (0, "b true"), result.err
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    result = await arun(
        *busctl_call(system_bus, "Switch", "asa{sv}", "2", "web", "tools", "0", prefix=as_member)
    )
    assert (result.rc, result.out.strip()) == (0, "b true"), result.err
    result = await arun(*busctl_call(system_bus, "Refresh", prefix=as_member))
    assert result.rc == 0, result.err
    result = await arun(*busctl_call(system_bus, "Detach", "sa{sv}", "web", "0", prefix=as_member))
    assert (result.rc, result.out.strip()) == (0, "b true"), result.err
    assert await get_property(client, "Attached") == ["tools"]
    assert not (sandbox_root / "usr/bin/web-tool").exists()

    # The same user without the group (dropped from the process): refused.
    dropped = ("setpriv", f"--reuid={member_user.uid}", f"--regid={member_user.gid}",
               "--clear-groups")  # fmt: skip
    result = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0", prefix=dropped))
    assert result.rc == 1
    assert "Access denied" in result.err
    assert await get_property(client, "Attached") == ["tools"]


# -- bad input ------------------------------------------------------------------------------------


async def still_serving(client: MessageBus, daemon: Daemon) -> None:
    rows = await listing(client)
    assert set(rows) == {"web", "tools", "old"}
    assert daemon.running()


async def test_bad_input_gets_documented_errors_and_the_daemon_keeps_serving(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    serve(daemon)
    await call_ok(client, "Attach", "sa{sv}", "tools", {})
    generation = await get_property(client, "Generation")

    # Unknown names: the message names the available ones.
    for member, signature, args in (
        ("Attach", "sa{sv}", ("webb", {})),
        ("Detach", "sa{sv}", ("webb", {})),
        ("Switch", "asa{sv}", (["tools", "webb"], {})),
    ):
        name, text = await call_error(client, member, signature, *args)
        assert name == ERR + "NoSuchPersonality", (member, name, text)
        assert text == "no personality named 'webb'; available: old, tools, web", member
        await still_serving(client, daemon)
    result = await arun(*gdbus_call(system_bus, "Attach", "webb", "{}"))
    assert f"{ERR}NoSuchPersonality: no personality named 'webb'; available:" in result.err

    # Invalid names.
    for bad in ("../x", "", "a" * 200):
        for member, signature, args in (
            ("Attach", "sa{sv}", (bad, {})),
            ("Detach", "sa{sv}", (bad, {})),
            ("Switch", "asa{sv}", (["tools", bad], {})),
        ):
            name, text = await call_error(client, member, signature, *args)
            assert name == ERR + "InvalidName", (member, bad, name, text)
            assert text.startswith("invalid personality name"), text
            assert len(text) < 300
        await still_serving(client, daemon)
    result = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "../x", "0"))
    assert result.rc == 1
    assert "invalid personality name '../x'" in result.err

    # Wrong option types and unknown options.
    for member, signature, first, options, needle in (
        ("Attach", "sa{sv}", "web", {"timeout": Variant("s", "5")}, "'timeout'"),
        ("Switch", "asa{sv}", ["web"], {"timeout": Variant("s", "5")}, "'timeout'"),
        ("Attach", "sa{sv}", "web", {"force": Variant("i", 1)}, "'force'"),
        ("Switch", "asa{sv}", ["web"], {"force": Variant("i", 1)}, "'force'"),
        ("Attach", "sa{sv}", "web", {"speed": Variant("u", 1)}, "'speed'"),
        ("Detach", "sa{sv}", "tools", {"force": Variant("b", True)}, "'force'"),
        ("Detach", "sa{sv}", "tools", {"color": Variant("s", "red")}, "'color'"),
    ):
        name, text = await call_error(client, member, signature, first, options)
        assert name == INVALID_ARGS, (member, options, name, text)
        assert needle in text, text
        await still_serving(client, daemon)
    # Wrong signatures altogether.
    name, _ = await call_error(client, "Attach", "s", "web")
    assert name == INVALID_ARGS
    name, _ = await call_error(client, "Switch", "sa{sv}", "web", {})
    assert name == INVALID_ARGS
    result = await arun(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "1", "timeout", "s", "5")
    )
    assert result.rc == 1
    assert "option 'timeout' must be of D-Bus type 'u'" in result.err
    result = await arun(*gdbus_call(system_bus, "Attach", "web", "{'force': <1>}"))
    assert f"{INVALID_ARGS}: option 'force' must be of D-Bus type 'b'" in result.err, result.err

    # A volume that never comes: Timeout once the time asked for has passed, never before.
    # (That other calls are answered while one waits: frontends/test_service_interface.py.)
    started = time.monotonic()
    waiting = asyncio.create_task(
        call_error(client, "Attach", "sa{sv}", "never", {"timeout": Variant("u", 2)})
    )
    await still_serving(client, daemon)
    name, text = await asyncio.wait_for(waiting, 120)
    waited = time.monotonic() - started
    assert name == ERR + "Timeout", (name, text)
    assert "'never'" in text and "2 s" in text, text
    assert waited >= 1.9, f"Timeout after {waited:.2f} s, before the 2 s asked for"
    name, _ = await call_error(
        client, "Switch", "asa{sv}", ["tools", "never"], {"timeout": Variant("u", 1)}
    )
    assert name == ERR + "Timeout"

    # Nothing of this changed the stack; the daemon is fine.
    await still_serving(client, daemon)
    assert await get_property(client, "Attached") == ["tools"]
    assert await get_property(client, "Desired") == ["tools"]
    assert await get_property(client, "Generation") == generation
    assert await call_ok(client, "Attach", "sa{sv}", "web", {}) == [True]
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    no_traceback(daemon)


async def test_sigterm_answers_a_waiting_call_with_busy(
    serve: Serve, daemon: Daemon, system_bus: str, client: MessageBus
) -> None:
    serve(daemon)
    waiting = asyncio.ensure_future(
        call_error(client, "Attach", "sa{sv}", "never-comes", {"timeout": Variant("u", 600)})
    )
    # Calls on one connection are read in order: once a later one is answered, the daemon
    # has the Attach (the pause gives it time to reach its wait; the outcome is Busy anyway).
    await listing(client)
    await asyncio.sleep(0.5)
    assert not waiting.done()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    name, text = await asyncio.wait_for(waiting, 120)
    assert name == ERR + "Busy", (name, text)
    assert "stopping" in text
    assert daemon.stop() == 0
