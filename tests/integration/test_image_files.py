"""Personalities from image files and directory trees in search paths (docs/images.md),
end to end: the daemon finds the entries (live, through inotify), lists them, attaches them
through loop devices of its own made from the opened file, and releases those again.

Observed from outside: ListPersonalities over D-Bus, files through the stack, `losetup --json`,
the journal, spool results.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from image_entries import RUN_DIR, install, is_flag, loops_backed_under, search_dir
from sandbox_view import REFUSED, Images, ok, read
from served_daemon import Serve, connection, listing, wait_listed

from testkit.contract import BUS, PATH
from testkit.daemon import Daemon
from testkit.dbus import Signals
from testkit.ddi import build_disk_image
from testkit.images import write_tree
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.polling import wait_for
from testkit.processes import run

RELEASE_DIR = "usr/lib/extension-release.d"
WEB = {"usr/bin/web-tool": "#!/bin/sh\necho web\n", "etc/web.conf": "web = 1\n"}


async def test_image_file_is_found_attached_and_released(
    serve: Serve, daemon: Daemon, client: MessageBus, image: Images, sandbox_root: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    directory = search_dir(sandbox_root)
    built = image("web", WEB, manifest={"ID": "_any", "IMAGE_VERSION": "1.2"})
    entry = install(built, directory, "web.raw")
    serve(daemon)
    state, version, device, mount_point = await wait_listed(client, "web", "available")
    assert (version, device, mount_point) == ("1.2", str(entry), "")
    assert loops_backed_under(sandbox_root) == []  # the probe's loop is gone again

    ok(daemon.request({"action": "attach", "personality": "web"}))
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    state, version, device, mount_point = (await listing(client))["web"]
    assert state == "attached" and device.startswith("/dev/loop")
    assert mount_point == str(sandbox_root / "opt/personality/web")
    (row,) = loops_backed_under(sandbox_root)
    assert row["name"] == device and row["back-file"] == str(entry)
    assert is_flag(row["ro"]) and is_flag(row["autoclear"])

    ok(daemon.request({"action": "detach", "personality": "web"}))
    assert not (sandbox_root / "usr/bin/web-tool").exists()
    wait_for(lambda: loops_backed_under(sandbox_root) == [], timeout=60, what="loop released")
    await wait_listed(client, "web", "available")
    assert "Traceback" not in daemon.log_text()


async def test_entries_appear_and_disappear_live(
    serve: Serve, daemon: Daemon, client: MessageBus, image: Images, sandbox_root: Path,
    system_bus: str,
) -> None:  # fmt: skip
    serve(daemon)
    async with (
        connection(system_bus) as watcher,
        Signals(watcher, sender=BUS, path=PATH) as signals,
    ):
        directory = search_dir(sandbox_root)  # made after the start: found through its parent
        install(image("late", WEB), directory, "late.raw")
        await signals.wait_for(present_is(["late"]), timeout=120)
        assert (await listing(client))["late"][0] == "available"
        ok(daemon.request({"action": "attach", "personality": "late"}))
        (directory / "late.raw").unlink()  # the attached content stays, loop and all
        assert read(sandbox_root, "etc/web.conf") == b"web = 1\n"
        assert (await listing(client))["late"][0] == "attached"
        assert len(loops_backed_under(sandbox_root)) == 1
        ok(daemon.request({"action": "detach", "personality": "late"}))
        await signals.wait_for(present_is([]), timeout=120)
        assert "late" not in await listing(client)


def present_is(names: list[str]) -> Callable[[Message], bool]:
    """A PropertiesChanged that says the listing now holds exactly `names`."""

    def matches(msg: Message) -> bool:
        if msg.member != "PropertiesChanged" or "Present" not in msg.body[1]:
            return False
        return bool(msg.body[1]["Present"].value == names)

    return matches


async def test_every_kind_of_entry_is_stacked(
    serve: Serve, daemon: Daemon, client: MessageBus, image: Images, sandbox_root: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    directory = search_dir(sandbox_root)
    kinds = {
        "sq": ("sq.raw", image("sq", {"usr/bin/sq": "sq\n"})),
        "ero": ("ero.erofs", image("ero", {"usr/bin/ero": "ero\n"}, "erofs")),
        "ext": ("ext.img", image("ext", {"usr/bin/ext": "ext\n"}, "ext4")),
        "sys": ("sys.sysext.raw", image("sys", {"usr/bin/sys": "sys\n"})),
        "squ": ("squ.squashfs", image("squ", {"usr/bin/squ": "squ\n"})),
    }
    for filename, built in kinds.values():
        install(built, directory, filename)
    tree = tmp_path / "ddi-tree"
    write_tree(tree, {"usr/bin/ddi": "ddi\n", f"{RELEASE_DIR}/extension-release.ddi": "ID=_any\n"})
    install(build_disk_image(tree, tmp_path / "ddi.raw"), directory, "ddi.raw")
    usr_tree = tmp_path / "usr-tree"  # a "usr" partition: its tree is what goes under usr/
    write_tree(usr_tree, {"usr/bin/ddiusr": "ddiusr\n",
                          f"{RELEASE_DIR}/extension-release.ddiusr": "ID=_any\n"})  # fmt: skip
    disk = build_disk_image(usr_tree, tmp_path / "ddiusr.raw", kind="usr", fs="erofs")
    install(disk, directory, "ddiusr.raw")
    # The sysupdate layout: a symlink to the current version, which is no entry of its own.
    install(image("ver", {"usr/bin/ver": "1.2\n"}), directory, "ver_1.2.raw")
    os.symlink("ver_1.2.raw", directory / "ver.raw")
    dev = directory / "dev"
    write_tree(dev, {"usr/bin/dev": "dev\n", f"{RELEASE_DIR}/extension-release.dev": "ID=_any\n"})
    serve(daemon)
    names = [*kinds, "ddi", "ddiusr", "ver", "dev"]
    for name in names:
        await wait_listed(client, name, "available")
    rows = await listing(client)
    assert "ver_1.2" not in rows
    assert rows["ver"][2] == str(directory / "ver_1.2.raw")
    ok(daemon.request({"action": "switch", "personalities": names}))
    for name in names:
        expected = "1.2\n" if name == "ver" else f"{name}\n"
        assert read(sandbox_root, f"usr/bin/{name}") == expected.encode()
    # Directory trees are a read-only bind: no loop device; the files have one each.
    assert len(loops_backed_under(sandbox_root)) == len(names) - 1
    assert (await listing(client))["dev"][2] == str(dev)
    ok(daemon.request({"action": "switch", "personalities": []}))
    wait_for(lambda: loops_backed_under(sandbox_root) == [], timeout=60, what="loops released")


def test_entries_that_root_does_not_own_alone_are_refused(
    daemon: Daemon, image: Images, sandbox_root: Path, journal: JournalReader
) -> None:
    directory = search_dir(sandbox_root)
    cases: dict[str, str] = {}

    def entry(name: str) -> Path:
        made = install(image(name, WEB), directory, f"{name}.raw")
        return made

    os.chown(entry("userowned"), 1000, 1000)
    cases["userowned"] = "owned by uid 1000"
    os.chmod(entry("groupw"), 0o664)
    cases["groupw"] = "writable by its group"
    os.chmod(entry("otherw"), 0o646)
    cases["otherw"] = "writable by others"
    target = entry("linked_1")
    os.symlink(target.name, directory / "linked.raw")
    os.lchown(directory / "linked.raw", 1000, 1000)
    cases["linked"] = "owned by uid 1000"
    target = entry("pointed_1")  # the link is root's, its target is not
    os.chown(target, 1000, 1000)
    os.symlink(target.name, directory / "pointed.raw")
    cases["pointed"] = "owned by uid 1000"
    # A whole search directory writable by others: nothing in it is used.
    loose = search_dir(sandbox_root, RUN_DIR)
    install(image("loose", WEB), loose, "loose.raw")
    os.chmod(loose, 0o777)
    daemon.start()
    entries = journal.entries(REFUSED, min_count=len(cases) + 1, timeout=120)
    reasons = {e.get("PERSONALITY_DEVICE", ""): e["PERSONALITY_REASON"] for e in entries}
    for name, why in cases.items():
        matching = [r for path, r in reasons.items() if f"/{name}" in path]
        assert matching and why in matching[0], (name, reasons)
    assert "writable by others" in reasons[str(loose)], reasons
    result = daemon.request({"action": "attach", "personality": "userowned"})
    assert (result["_dir"], result["code"]) == ("failed", "no-such-personality")
    result = daemon.request({"action": "attach", "personality": "loose"})
    assert (result["_dir"], result["code"]) == ("failed", "no-such-personality")


def test_block_devices_come_first_then_search_paths_in_order(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    early, late = search_dir(sandbox_root, RUN_DIR), search_dir(sandbox_root)
    install(image("web", {"usr/bin/which": "late\n"}), late, "web.raw")
    install(image("web", {"usr/bin/which": "early\n"}), early, "web.raw")
    install(image("dup", {"usr/bin/dup": "file\n"}), late, "dup.raw")
    loop_devices.attach(image("dup", {"usr/bin/dup": "device\n"}))
    daemon.start()
    ok(daemon.request({"action": "switch", "personalities": ["web", "dup"]}))
    assert read(sandbox_root, "usr/bin/which") == b"early\n"
    assert read(sandbox_root, "usr/bin/dup") == b"device\n"
    log = daemon.log_text()
    assert "image_entry_duplicate" in log and str(late / "web.raw") in log
    assert "volume_name_taken" in log and str(late / "dup.raw") in log


def test_personalityctl_build_writes_straight_into_a_search_path(
    daemon: Daemon, sandbox_root: Path, tmp_path: Path
) -> None:
    directory = search_dir(sandbox_root)
    daemon.start()
    tree = tmp_path / "site"
    write_tree(tree, {"usr/share/site/index.html": "<h1>site</h1>\n"})
    output = directory / "site.raw"
    run(sys.executable, "-m", "personalityd.client.cli", "build", str(tree), "--name", "site",
        "--id", "_any", "-o", str(output))  # fmt: skip
    assert sorted(p.name for p in directory.iterdir()) == ["site.raw"]  # no temporary left
    ok(daemon.request({"action": "attach", "personality": "site", "timeout": 60}))
    assert read(sandbox_root, "usr/share/site/index.html") == b"<h1>site</h1>\n"


def test_an_image_file_is_held_to_the_trust_boundary(
    daemon: Daemon, image: Images, sandbox_root: Path, journal: JournalReader
) -> None:
    directory = search_dir(sandbox_root)
    install(image("setid", {"usr/bin/su-ish": ("file", "x", 0o4755)}), directory, "setid.raw")
    install(image("passwd", {"etc/passwd": "root::0:0::/:/bin/sh\n"}), directory, "passwd.raw")
    daemon.start()
    for name, why in (("setid", "set-id file"), ("passwd", "protected path /etc/passwd")):
        result = daemon.request({"action": "attach", "personality": name, "force": True})
        assert (result["_dir"], result["code"]) == ("failed", "incompatible"), result
        assert why in str(result["message"]), result
    assert not (sandbox_root / "etc/passwd").exists()
    assert not (sandbox_root / "usr/bin/su-ish").exists()
    reasons = [e["PERSONALITY_REASON"] for e in journal.entries(REFUSED, min_count=2)]
    assert any("set-id" in r for r in reasons) and any("/etc/passwd" in r for r in reasons)
