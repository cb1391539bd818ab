"""The real daemon's D-Bus methods and properties (docs/dbus.md), through dbus-fast and busctl.

The daemon runs as `python -m personalityd` on a sandbox root and a private system bus
(`daemon_api/conftest.py`); what it answers is checked against the files under the sandbox root.
The names are spelled out from the documented API, not imported from the daemon.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from bus_clients import ERR, arun, busctl, busctl_call, busctl_json
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from served_daemon import Images, Serve, Trio, listing, no_traceback, read

from testkit.contract import BUS, IFACE, PATH
from testkit.daemon import Daemon
from testkit.dbus import call_error, call_ok, get_all, get_property, parse_introspect
from testkit.images import build_writable_image
from testkit.loops import LoopDevices
from testkit.polling import wait_for
from testkit.processes import run
from testkit.sandbox import BASE_TOOL_BYTES

# -- methods and properties through dbus-fast -----------------------------------------------------


async def test_methods_and_properties_through_dbus_fast(
    serve: Serve,
    daemon: Daemon,
    trio: Trio,
    client: MessageBus,
    sandbox_root: Path,
    loop_devices: LoopDevices,
) -> None:
    serve(daemon)
    rows = await listing(client)
    assert rows == {
        "old": ("incompatible", "0.9", trio.old, ""),
        "tools": ("available", "1.0", trio.tools, ""),
        "web": ("available", "2.1", trio.web, ""),
    }
    assert await get_all(client) == {
        "Attached": [],
        "Desired": [],
        "Generation": 0,
        "ConflictCount": 0,
        "WritableDevice": "",
        "Present": ["old", "tools", "web"],
        "Notices": [],
    }

    assert await call_ok(client, "Attach", "sa{sv}", "web", {}) == [True]
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    assert read(sandbox_root, "etc/web.conf") == b"web = 1\n"
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert await call_ok(client, "Attach", "sa{sv}", "web", {}) == [False]
    rows = await listing(client)
    state, version, device, mount_point = rows["web"]
    assert (state, version, device) == ("attached", "2.1", trio.web)
    assert mount_point, rows
    assert Path(mount_point).name == "web"
    assert await get_property(client, "Attached") == ["web"]
    assert await get_property(client, "Desired") == ["web"]
    generation = await get_property(client, "Generation")
    assert generation >= 1

    assert await call_ok(client, "Switch", "asa{sv}", ["tools", "web"], {}) == [True]
    assert await call_ok(client, "Switch", "asa{sv}", ["tools", "web"], {}) == [False]
    assert read(sandbox_root, "usr/bin/tools-tool") == b"#!/bin/sh\necho tools\n"
    assert await get_property(client, "Attached") == ["tools", "web"]
    assert await get_property(client, "Generation") == generation + 1

    assert await call_ok(client, "Detach", "sa{sv}", "web", {}) == [True]
    assert await call_ok(client, "Detach", "sa{sv}", "web", {}) == [False]
    assert not (sandbox_root / "usr/bin/web-tool").exists()
    assert not (sandbox_root / "etc/web.conf").exists()
    assert read(sandbox_root, "usr/bin/tools-tool") == b"#!/bin/sh\necho tools\n"
    assert await get_property(client, "Attached") == ["tools"]
    assert await get_property(client, "Generation") == generation + 2

    # Forced, the incompatible one is stacked; then its volume goes away: it is pending.
    assert await call_ok(client, "Attach", "sa{sv}", "old", {"force": Variant("b", True)}) == [True]
    assert read(sandbox_root, "etc/old.conf") == b"old = 1\n"
    assert (await listing(client))["old"][0] == "attached"
    loop_devices.yank(trio.old)
    wait_for(lambda: not (sandbox_root / "etc/old.conf").exists(), what="old to go")
    assert (await listing(client))["old"][0] == "pending"
    # Once the kernel has let go of the yanked device, no device is shown any more.
    deadline = time.monotonic() + 120
    while (row := (await listing(client))["old"]) != ("pending", "", "", ""):
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.1)
    assert await get_property(client, "Attached") == ["tools"]
    assert await get_property(client, "Desired") == ["tools", "old"]

    generation = await get_property(client, "Generation")
    assert await call_ok(client, "Refresh") == []  # nothing changed: nothing rebuilt
    assert await get_property(client, "Attached") == ["tools"]
    assert await get_property(client, "Generation") == generation
    assert await call_ok(client, "Switch", "asa{sv}", [], {}) == [True]
    assert await get_property(client, "Attached") == []
    assert await get_property(client, "Desired") == []
    assert not (sandbox_root / "usr/bin/tools-tool").exists()
    no_traceback(daemon)


# -- the same through busctl ----------------------------------------------------------------------


async def test_introspection_of_the_real_daemon_lists_every_member(
    serve: Serve, daemon: Daemon, system_bus: str, trio: Trio, client: MessageBus
) -> None:
    serve(daemon)
    await call_ok(client, "Attach", "sa{sv}", "web", {})
    result = await arun(*busctl(system_bus, "introspect", BUS, PATH))
    assert result.rc == 0, result.err
    members = parse_introspect(result.out)
    assert {name: member[:2] for name, member in members.items()} == {
        "ListPersonalities": ("method", "-"),
        "Attach": ("method", "sa{sv}"),
        "Detach": ("method", "sa{sv}"),
        "Switch": ("method", "asa{sv}"),
        "ListConflicts": ("method", "-"),
        "Refresh": ("method", "-"),
        "Rollback": ("method", "ta{sv}"),
        "Confirm": ("method", "t"),
        "ListGenerations": ("method", "-"),
        "Attached": ("property", "as"),
        "Desired": ("property", "as"),
        "Generation": ("property", "t"),
        "ConflictCount": ("property", "u"),
        "WritableDevice": ("property", "s"),
        "Present": ("property", "as"),
        "Notices": ("property", "as"),
        "StackChanged": ("signal", "tas"),
        "PersonalityAttached": ("signal", "s"),
        "PersonalityDetached": ("signal", "s"),
    }
    assert members["ListPersonalities"][2] == "a(sssss)"
    assert members["ListConflicts"][2] == "a(ssasb)"
    assert members["ListGenerations"][2] == "a(tastss)"
    assert members["Rollback"][2] == "t"
    for method in ("Attach", "Detach", "Switch"):
        assert members[method][2] == "b"
    # Properties show their live values and that they announce changes.
    assert " ".join(" ".join(members["Attached"][2:]).split()) == '1 "web" emits-change'
    assert " ".join(" ".join(members["WritableDevice"][2:]).split()) == '"" emits-change'
    assert " ".join(members["Generation"][2:]).split() == ["1", "emits-change"]
    # The well-known name is the daemon's, and the standard interfaces are there.
    assert "org.freedesktop.DBus.Properties" in result.out
    assert "org.freedesktop.DBus.Introspectable" in result.out
    status = await arun(*busctl(system_bus, "status", BUS))
    assert f"PID={daemon.pid}" in status.out, status.out + status.err


async def test_every_method_and_property_through_busctl(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    sandbox_root: Path,
) -> None:
    serve(daemon)
    listed = await arun(*busctl_call(system_bus, "ListPersonalities"))
    assert listed.rc == 0, listed.err
    assert listed.out.strip() == (
        f'a(sssss) 3 "old" "incompatible" "0.9" "{trio.old}" "" '
        f'"tools" "available" "1.0" "{trio.tools}" "" '
        f'"web" "available" "2.1" "{trio.web}" ""'
    )

    attached = await arun(*busctl_call(system_bus, "Attach", "sa{sv}", "web", "0"))
    assert (attached.rc, attached.out.strip()) == (0, "b true"), attached.err
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    again = await arun(
        *busctl_call(system_bus, "Attach", "sa{sv}", "web", "2", "timeout", "u", "5", "force",
                     "b", "false")
    )  # fmt: skip
    assert (again.rc, again.out.strip()) == (0, "b false"), again.err

    as_json = await arun(*busctl_json(system_bus, "ListPersonalities"))
    assert as_json.rc == 0, as_json.err
    reply = json.loads(as_json.out)
    assert reply["type"] == "a(sssss)"
    (rows,) = reply["data"]
    by_name = {row[0]: row for row in rows}
    assert by_name["web"][:4] == ["web", "attached", "2.1", trio.web]
    assert by_name["web"][4].endswith("/opt/personality/web")
    assert (Path(by_name["web"][4]) / "usr/bin/web-tool").is_file()
    assert by_name["tools"] == ["tools", "available", "1.0", trio.tools, ""]

    switched = await arun(
        *busctl(system_bus, "--json=short", "call", BUS, PATH, IFACE, "Switch", "asa{sv}", "2",
                "tools", "web", "0")
    )  # fmt: skip
    assert json.loads(switched.out) == {"type": "b", "data": [True]}, switched.err
    assert read(sandbox_root, "etc/tools.conf") == b"tools = 1\n"

    props = await arun(
        *busctl(system_bus, "get-property", BUS, PATH, IFACE,
                "Attached", "Desired", "Generation", "ConflictCount", "WritableDevice")
    )  # fmt: skip
    assert props.rc == 0, props.err
    assert props.out.splitlines() == [
        'as 2 "tools" "web"',
        'as 2 "tools" "web"',
        "t 2",
        "u 0",
        's ""',
    ]
    for name, expected in (
        ("Attached", {"type": "as", "data": ["tools", "web"]}),
        ("Generation", {"type": "t", "data": 2}),
        ("ConflictCount", {"type": "u", "data": 0}),
        ("WritableDevice", {"type": "s", "data": ""}),
    ):
        prop = await arun(
            *busctl(system_bus, "--json=short", "get-property", BUS, PATH, IFACE, name)
        )
        assert json.loads(prop.out) == expected, (name, prop.out, prop.err)

    detached = await arun(*busctl_json(system_bus, "Detach", "sa{sv}", "tools", "0"))
    assert json.loads(detached.out) == {"type": "b", "data": [True]}, detached.err
    assert not (sandbox_root / "etc/tools.conf").exists()
    again = await arun(*busctl_call(system_bus, "Detach", "sa{sv}", "tools", "0"))
    assert again.out.strip() == "b false", again.err

    conflicts = await arun(*busctl_json(system_bus, "ListConflicts"))
    assert json.loads(conflicts.out) == {"type": "a(ssasb)", "data": [[]]}, conflicts.err
    refresh = await arun(*busctl_call(system_bus, "Refresh"))
    assert (refresh.rc, refresh.out.strip()) == (0, ""), refresh.err
    refresh_json = await arun(*busctl_json(system_bus, "Refresh"))
    assert refresh_json.rc == 0, refresh_json.err
    final = await arun(*busctl(system_bus, "get-property", BUS, PATH, IFACE, "Attached"))
    assert final.out.strip() == 'as 1 "web"'
    no_traceback(daemon)


async def test_list_conflicts_after_personalities_share_files(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    image: Images,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    same = {"usr/share/doc/shared/README": b"the same bytes\n"}
    loop_devices.attach(image("alpha", {"usr/bin/tool": b"alpha\n", **same}))
    loop_devices.attach(image("beta", {"usr/bin/tool": b"beta\n", **same}, "erofs"))
    loop_devices.attach(image("gamma", {"usr/bin/tool": b"gamma\n", "etc/gamma.conf": "g"}))
    serve(daemon)
    assert await call_ok(client, "ListConflicts") == [[]]

    await call_ok(client, "Switch", "asa{sv}", ["alpha", "beta", "gamma"], {})
    assert read(sandbox_root, "usr/bin/tool") == b"gamma\n"
    (rows,) = await call_ok(client, "ListConflicts")
    assert rows == [
        ("/usr/bin/tool", "gamma", ["beta", "alpha"], False),
        ("/usr/share/doc/shared/README", "beta", ["alpha"], True),
    ]
    assert await get_property(client, "ConflictCount") == 2

    as_json = await arun(*busctl_json(system_bus, "ListConflicts"))
    data = json.loads(as_json.out)
    assert data["type"] == "a(ssasb)"
    assert data["data"][0] == [
        ["/usr/bin/tool", "gamma", ["beta", "alpha"], False],
        ["/usr/share/doc/shared/README", "beta", ["alpha"], True],
    ]
    text = await arun(*busctl_call(system_bus, "ListConflicts"))
    assert '"/usr/bin/tool" "gamma" 2 "beta" "alpha" false' in text.out, text.out
    count = await arun(*busctl(system_bus, "get-property", BUS, PATH, IFACE, "ConflictCount"))
    assert count.out.strip() == "u 2"

    await call_ok(client, "Detach", "sa{sv}", "beta", {})
    (rows,) = await call_ok(client, "ListConflicts")
    assert rows == [("/usr/bin/tool", "gamma", ["alpha"], False)]
    assert await get_property(client, "ConflictCount") == 1


@pytest.mark.parametrize("kind", ["volume", "tmpfs"])
async def test_writable_device_property(
    kind: str,
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    image: Images,
    tmp_path: Path,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("cfg", {"etc/cfg.conf": "cfg\n"}))
    if kind == "volume":
        expected = loop_devices.attach(build_writable_image(tmp_path), read_only=False)
    else:
        daemon.update_config({"writable": {"fallback": "tmpfs"}})
        expected = "tmpfs"
    serve(daemon)
    assert await get_property(client, "WritableDevice") == expected
    # The upper is stacked with nothing attached; Attached still lists personalities only.
    assert await get_property(client, "Attached") == []
    assert await get_property(client, "ConflictCount") == 0
    (rows,) = await call_ok(client, "ListConflicts")
    assert rows == []
    await call_ok(client, "Attach", "sa{sv}", "cfg", {})
    assert await get_property(client, "WritableDevice") == expected
    assert await get_property(client, "Attached") == ["cfg"]
    result = await arun(*busctl(system_bus, "get-property", BUS, PATH, IFACE, "WritableDevice"))
    assert result.out.strip() == f's "{expected}"'
    # Writes really go there.
    (sandbox_root / "etc/local.conf").write_text("mine\n")
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    assert read(sandbox_root, "etc/cfg.conf") == b"cfg\n"
    await call_ok(client, "Detach", "sa{sv}", "cfg", {})
    assert await get_property(client, "Attached") == []
    assert await get_property(client, "WritableDevice") == expected
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"


async def test_refresh_retries_a_volume_that_failed(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    image: Images,
    client: MessageBus,
    sandbox_root: Path,
) -> None:
    flaky_image = image("flaky", {"usr/bin/flaky": b"works now\n"})
    good_bytes = flaky_image.read_bytes()
    flaky = loop_devices.attach(flaky_image)
    serve(daemon)
    # Recognised, then its medium goes bad before it is mounted.
    with open(flaky_image, "r+b") as f:
        f.write(b"\0" * 4096)
    run("blockdev", "--flushbufs", flaky)
    name, text = await call_error(client, "Attach", "sa{sv}", "flaky", {})
    assert name == ERR + "MountFailed", (name, text)
    assert "flaky" in text
    assert (await listing(client))["flaky"][0] == "failed"
    assert await get_property(client, "Attached") == []

    # Fixed; the daemon does not know until told to look again.
    flaky_image.write_bytes(good_bytes)
    run("blockdev", "--flushbufs", flaky)
    name, _ = await call_error(client, "Attach", "sa{sv}", "flaky", {})
    assert name == ERR + "MountFailed"
    result = await arun(*busctl_call(system_bus, "Refresh"))
    assert (result.rc, result.out.strip()) == (0, ""), result.err
    assert (await listing(client))["flaky"][:3] == ("available", "", flaky)
    assert await call_ok(client, "Attach", "sa{sv}", "flaky", {}) == [True]
    assert read(sandbox_root, "usr/bin/flaky") == b"works now\n"
    no_traceback(daemon)
