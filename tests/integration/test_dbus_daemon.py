"""The D-Bus API and personalityctl end to end: the real daemon, a private system bus, loop devices.

`test_dbus_service.py` and `test_personalityctl.py` check the D-Bus layer and the CLI over an
in-memory manager; here the same contract (DESIGN section 7) is checked against
`python -m personalityd` run as a subprocess on a sandbox root, the way other services and an
operator meet it: with `busctl` (also as `nobody` and as a member of the `personality` group),
`gdbus` (it shows error names), dbus-fast connections (one calls, another watches the signals),
`personalityctl`, and the files that appear under the sandbox root. The names are spelled out
from DESIGN.md, not imported from the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fixture import (
    BUS,
    IFACE,
    PATH,
    Signals,
    call,
    call_error,
    call_ok,
    get_all,
    get_property,
    parse_introspect,
    private_system_bus,
)
from support import (
    BASE_TOOL_BYTES,
    REPO,
    Daemon,
    LoopDevices,
    MemberUser,
    build_image,
    build_writable_image,
    pid_alive,
    run,
    wait_for,
)

ERR = "org.personalityd.personality1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ADDRESS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"
SERVING_EVENT = "event=dbus_serving"

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")

# Errors a changing call may get in a storm of valid requests (DESIGN section 7).
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

Images = Callable[..., Path]


# -- running things -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    def err_line(self) -> str:
        """The one line on stderr a failure must give (and no traceback)."""
        assert self.err.endswith("\n") and self.err.count("\n") == 1, repr(self.err)
        assert "Traceback" not in self.err
        return self.err.rstrip("\n")


async def arun(*argv: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> Result:
    """Run a command without blocking this test's event loop (its signal watchers)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def busctl(address: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, "busctl", f"--address={address}", *args]


def busctl_call(address: str, member: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return busctl(address, "call", BUS, PATH, IFACE, member, *args, prefix=prefix)


def busctl_json(address: str, member: str, *args: str) -> list[str]:
    return busctl(address, "--json=short", "call", BUS, PATH, IFACE, member, *args)


def gdbus_call(address: str, member: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [
        *prefix,
        *("gdbus", "call", "--address", address, "--dest", BUS, "--object-path", PATH),
        *("--method", f"{IFACE}.{member}", *args),
    ]


async def listing(bus: MessageBus) -> dict[str, tuple[str, str, str, str]]:
    """ListPersonalities as name -> (state, version, device, mount point)."""
    (rows,) = await call_ok(bus, "ListPersonalities")
    return {row[0]: tuple(row[1:]) for row in rows}


def read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def no_traceback(daemon: Daemon) -> None:
    assert daemon.running(), daemon.log_text()[-4000:]
    assert "Traceback" not in daemon.log_text()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def system_bus() -> Iterator[str]:
    """A private dbus-daemon with the system bus policy and ours, for the whole module."""
    with private_system_bus() as address:
        yield address


@pytest.fixture
def image(tmp_path: Path) -> Images:
    """`image(name, files, fmt="squashfs", **kw)`: a personality image in this test's tmp."""

    def make(name: str, files: dict[str, object], fmt: str = "squashfs", **kw: object) -> Path:
        return build_image(tmp_path, name, files, fmt, **kw)  # type: ignore[arg-type]

    return make


Serve = Callable[[Daemon], Daemon]


@pytest.fixture
def serve(system_bus: str) -> Serve:
    """`serve(daemon)`: start it on the private bus; return once it owns the bus name."""

    def start(daemon: Daemon) -> Daemon:
        daemon.env[ADDRESS_ENV] = system_bus
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

    return start


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


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
    """A second connection, for signals."""
    bus = await connect(system_bus)
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints


def web_files(tag: str = "web") -> dict[str, object]:
    return {f"usr/bin/{tag}-tool": f"#!/bin/sh\necho {tag}\n", f"etc/{tag}.conf": f"{tag} = 1\n"}


@dataclass
class Trio:
    """Three volumes on loop devices: web 2.1, tools 1.0, old (incompatible, for fedora)."""

    web: str
    tools: str
    old: str


@pytest.fixture
def trio(loop_devices: LoopDevices, image: Images) -> Trio:
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
        "Attached": ("property", "as"),
        "Desired": ("property", "as"),
        "Generation": ("property", "t"),
        "ConflictCount": ("property", "u"),
        "WritableDevice": ("property", "s"),
        "StackChanged": ("signal", "tas"),
        "PersonalityAttached": ("signal", "s"),
        "PersonalityDetached": ("signal", "s"),
    }
    assert members["ListPersonalities"][2] == "a(sssss)"
    assert members["ListConflicts"][2] == "a(ssasb)"
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
    await call_ok(client, "Attach", "sa{sv}", "cfg", {})
    assert await get_property(client, "WritableDevice") == expected
    result = await arun(*busctl(system_bus, "get-property", BUS, PATH, IFACE, "WritableDevice"))
    assert result.out.strip() == f's "{expected}"'
    # Writes really go there.
    (sandbox_root / "etc/local.conf").write_text("mine\n")
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    assert read(sandbox_root, "etc/cfg.conf") == b"cfg\n"


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
    return {k: v.value for k, v in msg.body[1].items()}


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
    assert log.count("event=dbus_access_denied") == 8, log[-3000:]
    assert "(uid 65534" in log
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
    # (That other calls are answered while one waits: test_dbus_service, with a long wait.)
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


# -- load -----------------------------------------------------------------------------------------

STORM = ("s1", "s2", "s3", "s4")


def check_storm_files(root: Path, attached: Sequence[str]) -> None:
    """What the stack shows for `attached` (bottom first) of the STORM personalities."""
    tool = root / "usr/bin/storm-tool"
    if attached:
        assert tool.read_bytes() == attached[-1].encode(), attached
    else:
        assert not tool.exists()
    for name in STORM:
        assert (root / f"etc/storm-{name}.conf").exists() == (name in attached), (name, attached)


async def test_fifty_concurrent_changes_from_five_connections(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    image: Images,
    watcher: MessageBus,
    sandbox_root: Path,
) -> None:
    for name in STORM:
        files = {"usr/bin/storm-tool": name, f"etc/storm-{name}.conf": name}
        loop_devices.attach(image(name, files))
    serve(daemon)
    rng = random.Random(3)
    requests: list[tuple[str, str, tuple[Any, ...]]] = []
    for _ in range(50):
        kind = rng.choice(("Attach", "Detach", "Switch"))
        if kind == "Switch":
            names = rng.sample(STORM, rng.randint(0, 3))
            options = {"force": Variant("b", False)} if rng.random() < 0.3 else {}
            requests.append((kind, "asa{sv}", (names, options)))
        else:
            requests.append((kind, "sa{sv}", (rng.choice(STORM), {})))
    buses = [await connect(system_bus) for _ in range(5)]
    try:
        async with Signals(watcher, sender=BUS, path=PATH) as signals:
            storm = asyncio.gather(
                *(
                    call(buses[i % 5], member, signature, *args)
                    for i, (member, signature, args) in enumerate(requests)
                )
            )
            replies = await asyncio.wait_for(storm, 600)  # a deadline for a hang, not a speed
            # A round trip on the watcher's connection: every earlier signal has arrived.
            attached = await get_property(watcher, "Attached")
        desired = await get_property(watcher, "Desired")
    finally:
        for bus in buses:
            bus.disconnect()
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints

    assert len(replies) == 50
    for (member, _, args), reply in zip(requests, replies, strict=True):
        if reply.message_type is MessageType.METHOD_RETURN:
            assert reply.signature == "b" and isinstance(reply.body[0], bool), (member, args)
        else:
            assert reply.message_type is MessageType.ERROR
            assert reply.error_name in DOCUMENTED_ERRORS, (member, args, reply.body)
    answered = sum(r.message_type is MessageType.METHOD_RETURN for r in replies)
    assert answered >= 45, [(r.error_name, r.body) for r in replies]

    # Every volume is there: the live stack is the desired list, and the last signal said so.
    assert attached == desired
    stack_changes = [list(m.body) for m in signals.received if m.member == "StackChanged"]
    # Calls that arrive while a change runs are coalesced into one rebuild, so the storm may
    # end on the stack it started from (e.g. a final Switch to nothing) with no change at all.
    if attached:
        assert stack_changes, "the stack changed but no StackChanged was sent"
    if stack_changes:
        generations = [g for g, _ in stack_changes]
        assert generations == list(range(generations[0], generations[0] + len(generations)))
        assert stack_changes[-1][1] == attached
        assert await get_property(watcher, "Generation") == generations[-1]
    check_storm_files(sandbox_root, attached)

    # One more request after the storm decides the stack.
    (changed,) = await call_ok(watcher, "Switch", "asa{sv}", ["s3", "s1"], {})
    assert changed == (attached != ["s3", "s1"])
    assert await get_property(watcher, "Attached") == ["s3", "s1"]
    check_storm_files(sandbox_root, ["s3", "s1"])
    assert pid_alive(daemon.pid or 0)
    no_traceback(daemon)


def big_image(tmp_path: Path, name: str, files: int) -> Path:
    """A squashfs personality with `files` small files under usr/share/big-NAME/.

    mksquashfs pseudo definitions (hard links to one pseudo file) stand in for writing the
    files: the image has `files` directory entries, built in a fraction of a second.
    """
    src = tmp_path / "images" / f"{name}.src"
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True)
    release.write_text("ID=_any\nIMAGE_VERSION=1\n")
    (src / "usr/share").mkdir()  # pseudo files go only under directories that exist
    top = f"usr/share/big-{name}"
    lines = [f"{top} d 755 0 0", f"{top}/seed f 644 0 0 echo {name}"]
    per_dir = 300
    for d in range((files + per_dir - 1) // per_dir):
        lines.append(f"{top}/d{d:03d} d 755 0 0")
        count = min(per_dir, files - d * per_dir)
        lines += [f"{top}/d{d:03d}/f{f:03d} L {top}/seed" for f in range(count)]
    pseudo = tmp_path / "images" / f"{name}.pseudo"
    pseudo.write_text("\n".join(lines) + "\n")
    image_path = tmp_path / "images" / f"{name}.squashfs"
    run("mksquashfs", src, image_path, "-noappend", "-quiet", "-no-progress", "-all-root",
        "-pf", pseudo)  # fmt: skip
    return image_path


async def test_list_personalities_answers_during_a_long_switch(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    tmp_path: Path,
    client: MessageBus,
    watcher: MessageBus,
    sandbox_root: Path,
) -> None:
    """The switch's work (mounts, then 300,000 entries indexed in worker threads) leaves the
    event loop free: ListPersonalities keeps answering, without error, while the Switch call
    is pending, and an answer shows the switch under way (a volume mounted, not attached yet).
    How fast the answers come is measured by `make bench`, not asserted here."""
    big = ("big1", "big2", "big3")
    for name in big:
        loop_devices.attach(big_image(tmp_path, name, 100_000))
    serve(daemon)
    await listing(watcher)  # warm up both connections
    await listing(client)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 600  # for a hang, not a speed
    switch = asyncio.create_task(call_ok(client, "Switch", "asa{sv}", list(big), {}))
    during: list[dict[str, tuple[str, str, str, str]]] = []
    while not switch.done():
        assert loop.time() < deadline, "the Switch call did not return"
        rows = await listing(watcher)  # an error reply fails the test here
        if not switch.done():
            during.append(rows)
    assert switch.result() == [True]

    def under_way(rows: dict[str, tuple[str, str, str, str]]) -> bool:
        return any(rows[n][0] != "attached" and rows[n][3] for n in big)

    shown = [rows for rows in during if under_way(rows)]
    print(f"{len(during)} answers while the Switch was pending, {len(shown)} showing it under way")
    assert shown, f"no answer showed the switch under way; answers while pending: {during}"
    assert await get_property(client, "Attached") == list(big)
    for name in big:
        assert read(sandbox_root, f"usr/share/big-{name}/d333/f099") == f"{name}\n".encode()
    assert daemon.log_text().count("event=volume_indexed") == 3


# -- personalityctl -------------------------------------------------------------------------------

CTL_PREFIX = "personalityctl: "


def ctl_env(extra: Mapping[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "daemon"), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def ctl(
    *argv: str,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    timeout: float = 120,
) -> Result:
    """`personalityctl ARGV...` as a user runs it (the bus from $DBUS_SYSTEM_BUS_ADDRESS)."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "personalityd.client.cli", *argv],
        capture_output=True, text=True, env=dict(env) if env is not None else ctl_env(),
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ctl_ok(*argv: str, **kw: Any) -> str:
    result = ctl(*argv, **kw)
    assert (result.rc, result.err) == (0, ""), (argv, result)
    return result.out


def ctl_fails(*argv: str, **kw: Any) -> str:
    """Exit 1 with exactly one line on stderr (returned without the prefix), nothing on stdout."""
    result = ctl(*argv, **kw)
    assert result.rc == 1, (argv, result)
    assert result.out == "", (argv, result)
    line = result.err_line()
    assert line.startswith(CTL_PREFIX), line
    return line.removeprefix(CTL_PREFIX)


def test_personalityctl_reading_verbs_in_both_output_modes(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("webplus", {"usr/bin/web-tool": "#!/bin/sh\necho plus\n"}))
    serve(daemon)
    assert ctl_ok("switch", "web", "webplus") == "Switched to: web webplus.\n"
    mount = str(daemon.mount_root)

    lines = ctl_ok("list").splitlines()
    assert lines[0].split() == ["NAME", "STATE", "VERSION", "DEVICE", "MOUNT", "POINT"]
    assert [line.split() for line in lines[1:5]] == [
        ["old", "incompatible", "0.9", trio.old, "-"],
        ["tools", "available", "1.0", trio.tools, "-"],
        ["web", "attached", "2.1", trio.web, f"{mount}/web"],
        ["webplus", "attached", "-", lines[4].split()[3], f"{mount}/webplus"],
    ]
    assert lines[5:] == ["", "4 personalities listed."]
    # Columns are aligned: every row's STATE starts where the header's does.
    column = lines[0].index("STATE")
    assert all(line[column - 1] == " " and line[column] != " " for line in lines[1:5])

    for argv in (("list", "--json"), ("--json", "list")):
        data = json.loads(ctl_ok(*argv))
        assert data[0] == {
            "name": "old",
            "state": "incompatible",
            "version": "0.9",
            "device": trio.old,
            "mount_point": "",
        }
        assert data[2] == {
            "name": "web",
            "state": "attached",
            "version": "2.1",
            "device": trio.web,
            "mount_point": f"{mount}/web",
        }

    status = ctl_ok("status")
    lines = status.splitlines()
    assert lines[0].endswith("Stack: bottom to top"), status
    assert lines[1].split() == ["1.", "web", "2.1", trio.web, f"{mount}/web"]
    assert lines[2].split()[:2] == ["2.", "webplus"]
    for expected in (
        "Incompatible: old",
        "Available: tools",
        "Writable: none (read-only stack)",
        "Generation: 1",
        "Conflicts: 1 (see 'personalityctl conflicts')",
    ):
        assert expected in status, (expected, status)
    data = json.loads(ctl_ok("status", "--json"))
    assert data["attached"] == ["web", "webplus"]
    assert data["desired"] == ["web", "webplus"]
    assert (data["generation"], data["conflict_count"], data["writable_device"]) == (1, 1, "")
    assert [p["name"] for p in data["personalities"]] == ["old", "tools", "web", "webplus"]
    assert json.loads(ctl_ok("--json", "status")) == data

    lines = ctl_ok("conflicts").splitlines()
    assert lines[0].split() == ["PATH", "WINNER", "SHADOWED", "IDENTICAL"]
    assert lines[1].split() == ["/usr/bin/web-tool", "webplus", "web", "no"]
    assert lines[2:] == ["", "1 conflict listed."]
    assert json.loads(ctl_ok("conflicts", "--json")) == [
        {"path": "/usr/bin/web-tool", "winner": "webplus", "shadowed": ["web"], "identical": False}
    ]

    # Pending: desired, its volume gone.
    webplus_dev = json.loads(ctl_ok("list", "--json"))[3]["device"]
    loop_devices.yank(webplus_dev)
    wait_for(
        lambda: read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n",
        what="webplus to leave the stack",
    )
    status = ctl_ok("status")
    assert "Pending: webplus" in status, status
    assert "Conflicts: none" in status
    assert ctl_ok("conflicts") == "No conflicts.\n"
    assert json.loads(ctl_ok("conflicts", "--json")) == []
    assert json.loads(ctl_ok("list", "--json"))[3]["state"] == "pending"

    # The bus from --bus-address, or from the environment; nobody may read too.
    without_env = ctl_env(drop=(ADDRESS_ENV,))
    explicit = ctl_ok("--bus-address", system_bus, "list", env=without_env)
    assert explicit == ctl_ok("list", env=ctl_env({ADDRESS_ENV: system_bus}))
    assert ctl_ok("list", prefix=NOBODY) == explicit
    assert json.loads(ctl_ok("status", "--json", prefix=NOBODY)) == json.loads(
        ctl_ok("status", "--json")
    )
    no_traceback(daemon)


def test_personalityctl_changing_verbs_and_exit_codes(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    late = image("late", {"usr/bin/late": b"arrived\n"})
    serve(daemon)
    assert ctl_ok("attach", "web") == "Attached web.\n"
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    assert ctl_ok("attach", "web") == "web is already attached.\n"

    assert ctl_fails("attach", "old").startswith("'old' is incompatible with the base: ID 'fedora'")
    assert ctl_ok("attach", "old", "--force") == "Attached old.\n"
    assert read(sandbox_root, "etc/old.conf") == b"old = 1\n"
    assert ctl_ok("detach", "old") == "Detached old.\n"
    assert ctl_ok("detach", "old") == "old is not attached.\n"
    assert not (sandbox_root / "etc/old.conf").exists()

    assert ctl_ok("switch", "tools", "web") == "Switched to: tools web.\n"
    assert ctl_ok("switch", "tools", "web") == "Already at: tools web.\n"
    assert read(sandbox_root, "etc/tools.conf") == b"tools = 1\n"
    assert ctl_ok("switch", "web", "--force") == "Switched to: web.\n"
    assert not (sandbox_root / "etc/tools.conf").exists()

    # --wait: the volume comes while personalityctl waits.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "personalityd.client.cli", "attach", "late", "--wait", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ctl_env(),
    )  # fmt: skip
    try:
        time.sleep(1)
        assert waiting.poll() is None
        loop_devices.attach(late)
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert (waiting.returncode, out, err) == (0, "Attached late.\n", "")
    assert read(sandbox_root, "usr/bin/late") == b"arrived\n"

    # Failures: exit 1, one line on stderr.
    started = time.monotonic()
    assert (
        ctl_fails("attach", "never", "--wait", "1") == "no volume for 'never' appeared within 1 s"
    )
    assert time.monotonic() - started >= 1
    for argv, message in (
        (("attach", "webb"), "no personality named 'webb'; available: late, old, tools, web"),
        (("detach", "webb"), "no personality named 'webb'; available: late, old, tools, web"),
        (
            ("switch", "web", "webb"),
            "no personality named 'webb'; available: late, old, tools, web",
        ),
        (("attach", "../x"), "invalid personality name '../x'"),
        (("attach", ""), "invalid personality name ''"),
        (("attach", "a" * 200), "invalid personality name 'aaaa"),
        (("switch", "web", "web"), "personality 'web' is listed more than once"),
    ):
        assert ctl_fails(*argv).startswith(message), argv
    assert "Attach is only allowed for root and members of the group 'personality'" in ctl_fails(
        "attach", "tools", prefix=NOBODY
    )
    assert "Switch is only allowed" in ctl_fails("switch", prefix=NOBODY)
    assert "Detach is only allowed" in ctl_fails("detach", "web", prefix=NOBODY)

    # Usage errors: exit 2.
    usage: tuple[tuple[str, ...], ...] = (
        ("attach",),
        ("attach", "web", "--wait", "soon"),
        ("detach",),
        ("nonsense",),
        ("--json", "detach", "web"),
        ("build", "somewhere"),
        (),
    )
    for usage_argv in usage:
        result = ctl(*usage_argv)
        assert result.rc == 2, (usage_argv, result)
        assert "usage:" in result.err, usage_argv
    for verb in ("list", "status", "attach", "detach", "switch", "conflicts", "build"):
        result = ctl(verb, "--help")
        assert result.rc == 0 and "usage:" in result.out, verb

    # None of the failures changed the stack.
    data = json.loads(ctl_ok("status", "--json"))
    assert data["attached"] == ["web", "late"]
    assert ctl_ok("switch") == "Switched to: the base only.\n"
    assert json.loads(ctl_ok("status", "--json"))["attached"] == []
    assert not (sandbox_root / "usr/bin/web-tool").exists()

    # With the daemon gone: exit 1, one line naming the bus name.
    no_traceback(daemon)
    daemon.stop()
    assert "cannot reach personalityd on the system bus: " in ctl_fails("list")
    assert BUS in ctl_fails("status")


def test_personalityctl_build_makes_images_the_daemon_stacks(
    serve: Serve,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
) -> None:
    src = tmp_path / "hello-src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
    (src / "usr/bin/hello").chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc/hello.conf").write_text("greeting = hello\n")
    other = tmp_path / "bye-src"
    (other / "opt/bye").mkdir(parents=True)
    (other / "usr/share/bye").mkdir(parents=True)
    (other / "usr/share/bye/README").write_text("bye\n")
    images = tmp_path / "images"
    images.mkdir()
    hello_img = images / "hello.squashfs"
    bye_img = images / "bye.erofs"

    out = ctl_ok(
        "build", str(src), "--name", "hello", "-o", str(hello_img),
        "--id", "debian", "--version-id", "12", "--version", "1.5",
    )  # fmt: skip
    assert out == f"Wrote {hello_img} (squashfs): personality hello.\n"
    out = ctl_ok(
        "build", str(other), "--name", "bye", "-o", str(bye_img), "--format", "erofs",
        "--id", "_any", "--version", "0.1",
    )  # fmt: skip
    assert out == f"Wrote {bye_img} (erofs): personality bye.\n"
    # Refusals: exit 1, one line; usage errors: exit 2.
    (src / "usr/lib").mkdir()
    (src / "usr/lib/os-release").write_text("ID=debian\n")
    assert "looks like a whole OS tree" in ctl_fails(
        "build", str(src), "--name", "x", "-o", str(images / "x.squashfs")
    )
    assert not (images / "x.squashfs").exists()
    assert ctl("build", str(other), "-o", str(images / "y.squashfs")).rc == 2
    assert ctl("build", str(other), "--name", "y", "-o", "y", "--format", "zip").rc == 2

    hello_dev = loop_devices.attach(hello_img)
    serve(daemon)
    bye_dev = loop_devices.attach(bye_img)  # while the daemon runs: found through udev
    wait_for(
        lambda: "bye" in ctl_ok("list"),
        what="the daemon to see the erofs volume",
    )
    data = {p["name"]: p for p in json.loads(ctl_ok("list", "--json"))}
    assert data["hello"] == {
        "name": "hello",
        "state": "available",
        "version": "1.5",
        "device": hello_dev,
        "mount_point": "",
    }
    assert (data["bye"]["state"], data["bye"]["version"], data["bye"]["device"]) == (
        "available", "0.1", bye_dev
    )  # fmt: skip

    assert ctl_ok("attach", "hello") == "Attached hello.\n"
    assert ctl_ok("attach", "bye") == "Attached bye.\n"
    hello = sandbox_root / "usr/bin/hello"
    assert hello.read_text() == "#!/bin/sh\necho hello\n"
    assert os.access(hello, os.X_OK)
    assert hello.stat().st_uid == 0
    assert read(sandbox_root, "etc/hello.conf") == b"greeting = hello\n"
    assert read(sandbox_root, "usr/share/bye/README") == b"bye\n"
    manifest = sandbox_root / "usr/lib/extension-release.d/extension-release.hello"
    assert manifest.read_text().splitlines()[:3] == [
        "ID=debian",
        "VERSION_ID=12",
        "IMAGE_VERSION=1.5",
    ]
    status = ctl_ok("status")
    assert "1. hello" in " ".join(status.split())
    assert "2. bye" in " ".join(status.split())
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
