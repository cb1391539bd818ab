"""The installed package under a real systemd (PID 1 of an nspawn container), as issue 4 asks.

The tests share one container and run in file order: the reboot test powers it off and boots
it again on the same rootfs, the watchdog test comes last.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from nspawn import (
    DEMO_LIBRARY,
    DEMO_STATE,
    DEMO_USER,
    FAKE_TOOL_MARKER,
    WEB_INDEX,
    Container,
    wait_until,
)

BUS_NAME = "org.personalityd.personality1"
OBJECT_PATH = "/org/personalityd/personality1"
INTERFACE = "org.personalityd.personality1.Manager"

# A D-Bus call from inside the container that prints the reply type and error name, using the
# dbus-fast the package bundles.
CALL_SCRIPT = textwrap.dedent(
    """\
    import asyncio, sys
    sys.path.insert(0, "/usr/lib/personalityd/lib")
    from dbus_fast import BusType, Message
    from dbus_fast.aio import MessageBus

    async def main():
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        reply = await bus.call(Message(
            destination="{bus}", path="{path}", interface="{interface}",
            member=sys.argv[1], signature=sys.argv[2], body=eval(sys.argv[3])))
        print(reply.message_type.name, reply.error_name or "", reply.body)

    asyncio.run(main())
    """
).format(bus=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE)


# The files process argv[1] maps from the filesystem mounted at /usr.
MAPPED_FROM_USR = textwrap.dedent(
    """\
    import os, sys
    dev = os.stat("/usr").st_dev
    for line in open(f"/proc/{sys.argv[1]}/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if os.makedev(major, minor) == dev:
                print(fields[5].strip())
    """
)


# The files process argv[1] has open on the filesystem mounted at /usr.
OPEN_FROM_USR = textwrap.dedent(
    """\
    import os, sys
    dev = os.stat("/usr").st_dev
    fds = f"/proc/{sys.argv[1]}/fd"
    for fd in os.listdir(fds):
        try:
            if os.stat(f"{fds}/{fd}").st_dev == dev:
                print(os.readlink(f"{fds}/{fd}"))
        except OSError:
            pass
    """
)


# Processes that hold files of a filesystem no longer mounted anywhere in the container (an
# old generation's overlay, a lazily unmounted volume): by maps, open files, cwd and root.
UNMOUNTED_HOLDERS = textwrap.dedent(
    """\
    import os
    mounted = set()
    for line in open("/proc/self/mountinfo"):
        major, minor = line.split()[2].split(":")
        mounted.add(os.makedev(int(major), int(minor)))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        held = set()
        try:
            for line in open(f"/proc/{pid}/maps"):
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    held.add((os.makedev(major, minor), fields[5].strip()))
            for name in ["cwd", "root"] + [f"fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]:
                try:
                    held.add((os.stat(f"/proc/{pid}/{name}").st_dev, name))
                except OSError:
                    pass
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        for dev, what in sorted(held):
            if dev not in mounted:
                print(pid, comm, f"{os.major(dev)}:{os.minor(dev)}", what)
    """
)


def active_since(container: Container, unit: str) -> int:
    """When `unit` last became active (monotonic usec; 0 if it never was)."""
    return int(
        container.show(unit, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"]
    )


def cached_libraries(container: Container) -> str:
    return container.run("ldconfig", "-p").stdout


def dbus_call(
    container: Container, member: str, signature: str, body: str, user: str | None = None
) -> str:
    return container.run(
        "python3", "-c", CALL_SCRIPT, member, signature, body, user=user
    ).stdout.strip()


def status(container: Container) -> dict[str, object]:
    result: dict[str, object] = json.loads(
        container.run("personalityctl", "status", "--json").stdout
    )
    return result


def attached(container: Container) -> list[str]:
    value = status(container)["attached"]
    assert isinstance(value, list)
    return [str(v) for v in value]


def exists(container: Container, path: str) -> bool:
    return container.run("test", "-e", path, check=False).returncode == 0


# --------------------------------------------------------------------------------------------


def test_service_active_with_status_and_bus_name(container: Container) -> None:
    container.wait_active("personalityd.service")
    props = container.show(
        "personalityd.service", "ActiveState", "SubState", "StatusText", "MainPID", "Type"
    )
    assert props["ActiveState"] == "active", props
    assert props["Type"] == "notify", props
    assert props["StatusText"].startswith("generation "), props
    main_pid = int(props["MainPID"])
    assert main_pid > 0

    # The bus name is owned by the daemon (the shipped policy lets root own it).
    owner = container.run(
        "busctl",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetConnectionUnixProcessID",
        "s",
        BUS_NAME,
    ).stdout.split()
    assert owner == ["u", str(main_pid)]

    # The daemon mounts in the system's mount namespace (no hardening option gave it its own).
    pid1_ns = container.run("readlink", "/proc/1/ns/mnt").stdout.strip()
    daemon_ns = container.run("readlink", f"/proc/{main_pid}/ns/mnt").stdout.strip()
    assert daemon_ns == pid1_ns

    # What the package set up: the group (sysusers.d), the spool where group members can drop
    # requests but not list them (tmpfiles.d), the vendor defaults.
    assert container.run("getent", "group", "personality").stdout.strip().endswith(":member")
    spool = container.run(
        "stat", "-c", "%a %U %G", "/var/spool/personalityd", "/var/lib/personalityd"
    ).stdout.split("\n")
    assert spool[:2] == ["1730 root personality", "700 root root"], spool
    assert exists(container, "/usr/lib/personalityd/personalityd.toml")

    # Both volumes were found by coldplug (udev in the container) and are available.
    assert container.personalities() == {"web": "available", "demo": "available"}

    # Reading is for everyone; changing is for root and the personality group only.
    listed = dbus_call(container, "ListPersonalities", "", "[]", user="tester")
    assert listed.startswith("METHOD_RETURN"), listed
    denied = dbus_call(container, "Attach", "sa{sv}", "['web', {}]", user="tester")
    assert denied.startswith("ERROR org.freedesktop.DBus.Error.AccessDenied"), denied
    refused = container.run("personalityctl", "attach", "web", user="tester", check=False)
    assert refused.returncode == 1, refused
    assert attached(container) == []

    # A member of the personality group may change the stack.
    container.run("personalityctl", "attach", "web", user="member")
    assert attached(container) == ["web"]
    container.run("personalityctl", "detach", "web", user="member")
    assert attached(container) == []

    # Nothing was attached at boot, so the early unit saw no web files.
    assert container.read("/run/early-check.out") == "missing\n"


def test_app_requiring_personality_unit(container: Container) -> None:
    assert container.is_active("app.service") == "inactive"
    container.run("systemctl", "start", "app.service", timeout=150)

    assert container.is_active("personality@web.service") == "active"
    assert container.is_active("app.service") == "active"
    assert attached(container) == ["web"]
    # The app started after web was stacked: it read web's file through /usr.
    wait_until(lambda: exists(container, "/run/app.out"), 10, "the app's output")
    assert container.read("/run/app.out") == WEB_INDEX
    assert container.read("/usr/share/web/index.html") == WEB_INDEX

    container.run("systemctl", "stop", "personality@web.service", timeout=150)
    assert container.is_active("personality@web.service") == "inactive"
    assert container.is_active("app.service") == "inactive"  # stopped by its Requires=
    assert attached(container) == []
    # Unmounted lazily: "draining" until the kernel lets go of the device, then available.
    wait_until(
        lambda: container.personalities()["web"] == "available", 15, "web to be available again"
    )
    assert not exists(container, "/usr/share/web/index.html")


def test_personality_services_started_and_stopped(container: Container) -> None:
    assert container.show("demo-web.service", "LoadState")["LoadState"] == "not-found"

    container.run("personalityctl", "attach", "demo", timeout=150)
    assert attached(container) == ["demo"]

    def demo_running() -> bool:
        props = container.show("demo-web.service", "LoadState", "ActiveState")
        return props == {"LoadState": "loaded", "ActiveState": "active"}

    wait_until(demo_running, 30, "demo-web.service to be loaded and active")
    wait_until(lambda: exists(container, "/run/demo-web.state"), 10, "demo-web's state file")
    assert container.read("/run/demo-web.state").strip() == DEMO_STATE

    container.run("personalityctl", "detach", "demo", timeout=150)
    assert attached(container) == []

    def demo_gone() -> bool:
        props = container.show("demo-web.service", "LoadState", "ActiveState")
        return props == {"LoadState": "not-found", "ActiveState": "inactive"}

    wait_until(demo_gone, 30, "demo-web.service to be stopped and unknown")
    assert not exists(container, "/usr/lib/systemd/system/demo-web.service")


def test_declarations_and_personality_unit_follow_the_stack(container: Container) -> None:
    assert container.is_active("personality@demo.service") == "inactive"
    assert DEMO_LIBRARY not in cached_libraries(container)

    container.run("personalityctl", "attach", "demo", timeout=200)
    # Answered once the start job of its service had finished.
    assert container.is_active("demo-web.service") == "active"
    # Its declarations, applied with the base's tools (the personality's own
    # systemd-sysusers never ran): the user, the directory of its tmpfiles.d line (the
    # service's ExecStartPre needs it), the linker's cache with its library.
    assert container.run("getent", "passwd", DEMO_USER).stdout.startswith(f"{DEMO_USER}:")
    owner_mode = container.run("stat", "-c", "%U %a", "/var/lib/demo").stdout.split()
    assert owner_mode == [DEMO_USER, "750"]
    assert not exists(container, FAKE_TOOL_MARKER)
    assert DEMO_LIBRARY in cached_libraries(container)
    # Attached without the unit: the daemon starts personality@demo, after the service.
    container.wait_active("personality@demo.service", timeout=60)
    assert active_since(container, "personality@demo.service") > active_since(
        container, "demo-web.service"
    )
    container.run("systemctl", "start", "demo-app.service", timeout=60)
    assert container.is_active("demo-app.service") == "active"

    # Detached: the unit and the unit that requires it are stopped, the cache made again.
    container.run("personalityctl", "detach", "demo", timeout=200)
    assert attached(container) == []
    for unit in ("personality@demo.service", "demo-app.service", "demo-web.service"):
        container.wait_active(unit, "inactive", timeout=30)
    assert DEMO_LIBRARY not in cached_libraries(container)
    wait_until(lambda: container.personalities()["demo"] == "available", 30, "demo released")

    # Through the unit: starting a unit that requires personality@demo attaches demo, and it
    # starts after the personality's service is up.
    container.run("systemctl", "start", "demo-app.service", timeout=200)
    assert attached(container) == ["demo"]
    since = [
        active_since(container, u)
        for u in ("demo-web.service", "personality@demo.service", "demo-app.service")
    ]
    assert 0 < since[0] < since[1] <= since[2], since
    # Stopping the unit detaches (its ExecStop), and stops what requires it.
    container.run("systemctl", "stop", "personality@demo.service", timeout=200)
    assert attached(container) == []
    assert container.is_active("demo-app.service") == "inactive"
    container.wait_active("demo-web.service", "inactive", timeout=30)
    assert status(container)["desired"] == []
    wait_until(lambda: container.personalities()["demo"] == "available", 30, "demo released")


def test_a_volume_that_goes_away_stops_its_unit_and_stays_desired(container: Container) -> None:
    container.run("personalityctl", "attach", "demo", timeout=200)
    container.wait_active("personality@demo.service", timeout=60)
    container.run("systemctl", "start", "demo-app.service", timeout=60)
    # The volume goes away as the daemon sees it: a `remove` uevent for its loop device (the
    # host's uevent file, bound in; the container's loop devices are web's, then demo's).
    uevent = f"/run/pdtest-uevent/{Path(container.loops[1]).name}"
    container.sh(f"echo remove > {uevent}")
    wait_until(lambda: attached(container) == [], 60, "demo to leave the live stack")
    for unit in ("personality@demo.service", "demo-app.service", "demo-web.service"):
        container.wait_active(unit, "inactive", timeout=30)
    # The unit's ExecStop detached nothing: demo is still desired, pending its volume.
    assert status(container)["desired"] == ["demo"]

    container.sh(f"echo add > {uevent}")
    wait_until(lambda: attached(container) == ["demo"], 60, "demo to be stacked again")
    container.wait_active("personality@demo.service", timeout=60)
    assert container.is_active("demo-web.service") == "active"
    container.run("personalityctl", "detach", "demo", timeout=200)
    container.wait_active("personality@demo.service", "inactive", timeout=30)
    try:
        wait_until(lambda: container.personalities()["demo"] == "available", 30, "demo released")
    except AssertionError as exc:
        holders = container.run("python3", "-c", UNMOUNTED_HOLDERS, check=False).stdout
        raise AssertionError(f"{exc}; files held off unmounted filesystems:\n{holders}") from None


def test_reboot_restores_desired_list_before_dependent_units(container: Container) -> None:
    container.run("personalityctl", "attach", "web", timeout=150)
    container.run("personalityctl", "attach", "demo", timeout=150)
    before = status(container)
    assert before["attached"] == ["web", "demo"]
    assert before["desired"] == ["web", "demo"]

    container.poweroff()
    container.boot()

    after = status(container)
    assert after["attached"] == ["web", "demo"]
    assert after["desired"] == ["web", "demo"]
    # Rebuilt from the persisted desired list: one new generation, never an older one.
    assert int(after["generation"]) > int(before["generation"])  # type: ignore[call-overload]
    # early-check.service (After=personalityd.service) ran with web already stacked.
    assert container.read("/run/early-check.out") == WEB_INDEX
    daemon = container.show("personalityd.service", "ActiveEnterTimestampMonotonic")
    check = container.show("early-check.service", "ExecMainStartTimestampMonotonic")
    assert int(check["ExecMainStartTimestampMonotonic"]) >= int(
        daemon["ActiveEnterTimestampMonotonic"]
    )
    # The restored demo personality's service was started at boot too, and every stacked
    # personality's unit, after the services (the shutdown's ExecStop detached nothing).
    container.wait_active("demo-web.service", timeout=30)
    container.wait_active("personality@web.service", timeout=60)
    container.wait_active("personality@demo.service", timeout=60)
    assert active_since(container, "personality@demo.service") > active_since(
        container, "demo-web.service"
    )

    container.run("personalityctl", "detach", "demo", timeout=150)
    assert attached(container) == ["web"]
    assert container.is_active("demo-web.service") == "inactive"


def test_watchdog_restarts_blocked_daemon(container: Container) -> None:
    container.run("personalityctl", "detach", "web", timeout=150)
    container.run("systemctl", "start", "app.service", timeout=150)
    assert attached(container) == ["web"]
    before = container.show("personalityd.service", "MainPID", "NRestarts", "WatchdogUSec")
    app_before = container.show("app.service", "MainPID")["MainPID"]
    assert before["WatchdogUSec"] not in ("0", "infinity"), before  # e.g. "30s"

    # SIGUSR2 blocks the daemon's event loop ([debug] block_signal = true): no more WATCHDOG=1.
    container.run(
        "systemctl", "kill", "--kill-who=main", "--signal=SIGUSR2", "personalityd.service"
    )
    timeout = 120  # the shipped WatchdogSec=30s, RestartSec=1s, and a start

    def restarted() -> bool:
        now = container.show("personalityd.service", "MainPID", "NRestarts", "ActiveState")
        return (
            int(now["NRestarts"]) > int(before["NRestarts"])
            and now["MainPID"] not in ("0", before["MainPID"])
            and now["ActiveState"] == "active"
        )

    wait_until(restarted, timeout, "systemd to restart the blocked daemon", interval=1)
    journal = container.journal("-u", "personalityd.service", lines=400)
    assert "Watchdog timeout" in journal, journal

    # The restart adopted the stack; the personality unit and the app were not disturbed.
    assert attached(container) == ["web"]
    assert container.is_active("personality@web.service") == "active"
    assert container.show("app.service", "MainPID")["MainPID"] == app_before
    assert exists(container, "/usr/share/web/index.html")

    # Started on a live /usr stack, the new daemon re-executed itself from the base: nothing it
    # maps is on the overlay (a personality replaces nothing it runs, nor is pinned by it).
    assert "reexec_from_base" in journal, journal
    pid = container.show("personalityd.service", "MainPID")["MainPID"]
    on_stack = container.run("python3", "-c", MAPPED_FROM_USR, pid).stdout.split()
    assert on_stack == [], on_stack


def test_restart_then_detach_releases_the_volumes(container: Container) -> None:
    container.run("personalityctl", "attach", "demo", timeout=200)
    assert attached(container) == ["web", "demo"]
    before = container.show("personalityd.service", "MainPID")["MainPID"]
    container.run("systemctl", "restart", "personalityd.service", timeout=200)
    container.wait_active("personalityd.service", timeout=120)
    pid = container.show("personalityd.service", "MainPID")["MainPID"]
    assert pid not in ("0", before)
    assert attached(container) == ["web", "demo"]

    # The new process neither maps nor holds open anything of the stack it started on...
    assert container.run("python3", "-c", MAPPED_FROM_USR, pid).stdout.split() == []
    assert container.run("python3", "-c", OPEN_FROM_USR, pid).stdout.split() == []

    # ...so what leaves the stack afterwards is released (never left draining by it).
    container.run("personalityctl", "detach", "demo", timeout=200)
    container.run("personalityctl", "detach", "web", timeout=200)
    assert attached(container) == []
    for name in ("web", "demo"):
        wait_until(
            lambda name=name: container.personalities()[name] == "available",
            60,
            f"{name} to be released after the restart",
        )
    for unit in ("personality@web.service", "personality@demo.service", "app.service"):
        assert container.is_active(unit) == "inactive", unit
