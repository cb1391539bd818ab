"""Protected paths (`volumes.protected_paths`, docs/configuration.md): volumes that provide,
delete or hide one are refused, even with force, over D-Bus and the spool; the journal says
why; the files of the stack stay the base's. Only the configuration lets such a volume in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bus_clients import ERR
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from served_daemon import Images, Serve, listing, read

from testkit.contract import MESSAGE_ID_VOLUME_REFUSED
from testkit.daemon import Daemon
from testkit.dbus import call_error, call_ok, get_property
from testkit.images import OPAQUE, WHITEOUT, build_image, rewrite_in_place
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.sandbox import OS_RELEASE

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
SHADOW = "root:!:19000::::::\n"
JOURNAL_WAIT = 60  # a deadline for a hang on a loaded machine, not a measure
FORCE = {"force": Variant("b", True)}

# name -> (files, the protected path the refusal must name)
HOSTILE: dict[str, tuple[dict[str, object], str]] = {
    "passwd": ({"etc/passwd": "evil::0:0::/:/bin/sh\n"}, "/etc/passwd"),
    "sudoers": ({"etc/sudoers.d/evil": "ALL ALL=(ALL) NOPASSWD: ALL\n"}, "/etc/sudoers.d"),
    "noshadow": ({"etc/shadow": WHITEOUT}, "/etc/shadow"),
    "libhider": ({"usr/lib": OPAQUE, "usr/lib/x.so": "x"}, "/usr/lib/personalityd"),
    "dropin": (
        {"etc/personalityd/personalityd.toml.d/50-x.toml": "[spool]\ndir = '/tmp'\n"},
        "/etc/personalityd",
    ),
}


def base_files(root: Path) -> None:
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/shadow").write_text(SHADOW)


def expect_base(root: Path) -> None:
    assert read(root, "etc/passwd") == PASSWD.encode()
    assert read(root, "etc/shadow") == SHADOW.encode()
    assert read(root, "usr/lib/os-release") == OS_RELEASE.encode()
    assert not (root / "etc/sudoers.d").exists()
    assert not (root / "etc/personalityd").exists()


async def test_hostile_volumes_are_refused_even_with_force(
    serve: Serve,
    daemon: Daemon,
    client: MessageBus,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    base_files(sandbox_root)
    devices = {name: loop_devices.attach(image(name, f)) for name, (f, _) in HOSTILE.items()}
    loop_devices.attach(image("fine", {"usr/bin/fine": "fine\n", "etc/fine.conf": "f\n"}))
    serve(daemon)

    rows = await listing(client)
    assert rows["fine"][0] == "available"
    for name, (_, path) in HOSTILE.items():
        assert rows[name][0] == "incompatible", (name, rows[name])
        (entry,) = journal.entries(
            MESSAGE_ID_VOLUME_REFUSED,
            timeout=JOURNAL_WAIT,
            PERSONALITY_NAME=name,
            _PID=str(daemon.pid),
        )
        assert entry["PERSONALITY_DEVICE"] == devices[name]
        assert f"protected path {path}" in entry["PERSONALITY_REASON"], entry
        error, message = await call_error(client, "Attach", "sa{sv}", name, FORCE)
        assert error == ERR + "Incompatible"
        assert message.startswith(f"'{name}' may not be stacked: "), message
        assert f"protected path {path}" in message
        spooled = daemon.request({"action": "attach", "personality": name, "force": True})
        assert (spooled["_dir"], spooled["code"]) == ("failed", "incompatible"), spooled
        assert f"protected path {path}" in spooled["message"]
        switched = daemon.request({"action": "switch", "personalities": ["fine", name]})
        assert (switched["_dir"], switched["code"]) == ("failed", "incompatible"), switched
    expect_base(sandbox_root)

    assert await call_ok(client, "Attach", "sa{sv}", "fine", {}) == [True]
    assert read(sandbox_root, "usr/bin/fine") == b"fine\n"
    expect_base(sandbox_root)
    assert await get_property(client, "Attached") == ["fine"]


async def test_only_the_configuration_lets_a_protected_path_through(
    serve: Serve,
    daemon: Daemon,
    client: MessageBus,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    base_files(sandbox_root)
    loop_devices.attach(image("passwd", HOSTILE["passwd"][0]))
    loop_devices.attach(image("noshadow", HOSTILE["noshadow"][0]))
    daemon.update_config({"volumes": {"protected_paths": ["/etc/shadow"]}})
    serve(daemon)

    rows = await listing(client)
    assert (rows["passwd"][0], rows["noshadow"][0]) == ("available", "incompatible")
    assert await call_ok(client, "Attach", "sa{sv}", "passwd", {}) == [True]
    assert read(sandbox_root, "etc/passwd") == b"evil::0:0::/:/bin/sh\n"
    error, _ = await call_error(client, "Attach", "sa{sv}", "noshadow", FORCE)
    assert error == ERR + "Incompatible"
    assert read(sandbox_root, "etc/shadow") == SHADOW.encode()


def test_content_changed_under_the_same_device_is_judged_on_what_is_stacked(
    daemon: Daemon,
    loop_devices: LoopDevices,
    sandbox_root: Path,
    tmp_path: Path,
    journal: JournalReader,
) -> None:
    """The probe saw a harmless image; the image was then rewritten in place on its loop
    device (same device, same DISKSEQ). The index of the mount that would be stacked shows
    /etc/passwd: the attach is refused, and the volume listed as incompatible from then on."""
    base_files(sandbox_root)
    padding = os.urandom(256 * 1024)  # incompressible: the hostile image fits in its place
    harmless = build_image(tmp_path, "swapped", {"etc/swapped.conf": "s\n", "usr/pad": padding})
    hostile = build_image(tmp_path, "swapped", {"etc/passwd": "evil::0:0::/:/bin/sh\n"})
    assert hostile.stat().st_size <= harmless.stat().st_size
    device = loop_devices.attach(harmless)
    daemon.start()
    rewrite_in_place(harmless, hostile)  # the same file: the same loop device and DISKSEQ
    subprocess.run(["blockdev", "--flushbufs", device], check=True)

    refused = daemon.request({"action": "attach", "personality": "swapped", "force": True})
    assert (refused["_dir"], refused["code"]) == ("failed", "incompatible"), refused
    assert "protected path /etc/passwd" in refused["message"]
    expect_base(sandbox_root)
    (entry,) = journal.entries(
        MESSAGE_ID_VOLUME_REFUSED,
        timeout=JOURNAL_WAIT,
        PERSONALITY_NAME="swapped",
        _PID=str(daemon.pid),
    )
    assert "protected path /etc/passwd" in entry["PERSONALITY_REASON"]
    again = daemon.request({"action": "attach", "personality": "swapped"})
    assert again["code"] == "incompatible", again
    assert not list(daemon.mount_root.iterdir())  # its mount was undone
