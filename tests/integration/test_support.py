"""Self-tests of the integration helpers: images, loop devices, udev, journal, spool, Daemon.

These pin down the machine facts the daemon's tests rely on (see the `testkit.udev` docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from testkit.contract import MESSAGE_ID_CONFLICT, MESSAGE_ID_STACK_CHANGED
from testkit.daemon import Daemon
from testkit.images import build_image, build_writable_image
from testkit.journal import JournalReader, field_list
from testkit.loops import LoopDevices, loop_backing_file
from testkit.mounts import mounts_snapshot, mounts_under, unmount_tree
from testkit.processes import run
from testkit.sandbox import BASE_TOOL_BYTES
from testkit.spool import spool_request
from testkit.udev import TEST_PROPERTY, UdevMonitor, udev_properties

FILES: dict[str, bytes | str | tuple[object, ...]] = {
    "usr/bin/tool": "#!/bin/sh\necho tool\n",
    "usr/lib/data.bin": bytes(range(256)),
    "usr/bin/tool-link": ("symlink", "tool"),
    "usr/share/empty": ("dir",),
    "etc/plain.conf": ("file", "x = 1\n", 0o600),
}


def mount_ro(dev: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "ro", dev, target)


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "ext4"])
def test_image_attaches_with_udev_properties_and_content(
    tmp_path: Path, loop_devices: LoopDevices, udev_token: str, fmt: str
) -> None:
    label = "personality-tool" if fmt == "ext4" else None
    manifest = {"ID": "debian", "VERSION_ID": "12", "PERSONALITY_DESCRIPTION": 'say "hi" $x'}
    image = build_image(tmp_path, "tools", FILES, fmt=fmt, manifest=manifest, label=label)

    dev = loop_devices.attach(image)

    props = udev_properties(dev)
    assert props["ID_FS_TYPE"] == fmt
    assert props[TEST_PROPERTY] == udev_token
    if label is not None:
        assert props["ID_FS_LABEL"] == label
    assert run("blockdev", "--getro", dev).strip() == "1"

    mnt = tmp_path / "mnt"
    mount_ro(dev, mnt)
    try:
        assert (mnt / "usr/bin/tool").read_text() == "#!/bin/sh\necho tool\n"
        assert os.access(mnt / "usr/bin/tool", os.X_OK)
        assert (mnt / "usr/lib/data.bin").read_bytes() == bytes(range(256))
        assert os.readlink(mnt / "usr/bin/tool-link") == "tool"
        assert (mnt / "usr/share/empty").is_dir()
        assert (mnt / "etc/plain.conf").stat().st_mode & 0o777 == 0o600
        release = (mnt / "usr/lib/extension-release.d/extension-release.tools").read_text()
        assert (
            release == 'ID="debian"\nVERSION_ID="12"\nPERSONALITY_DESCRIPTION="say \\"hi\\" \\$x"\n'
        )
        owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in mnt.rglob("*")}
        assert owners == {(0, 0)}
    finally:
        unmount_tree(mnt)
    loop_devices.detach(dev)
    assert loop_backing_file(dev) != str(image)


def test_image_without_manifest_and_default_manifest(tmp_path: Path) -> None:
    bare = build_image(tmp_path, "bare", {"usr/bin/x": "x"}, with_manifest=False)
    default = build_image(tmp_path, "dflt", {"usr/bin/x": "x"})
    again = build_image(tmp_path, "dflt", {"usr/bin/y": "y"})
    assert again != default and again.name == "dflt-2.squashfs"
    tree = tmp_path / "images"
    assert not (tree / "bare.tree/usr/lib/extension-release.d").exists()
    assert (tree / "dflt.tree/usr/lib/extension-release.d/extension-release.dflt").read_text() == (
        'ID="_any"\n'
    )
    assert bare.stat().st_size > 0


def test_writable_image_is_labelled_ext4_and_writable(
    tmp_path: Path, loop_devices: LoopDevices, udev_token: str
) -> None:
    image = build_writable_image(tmp_path)
    dev = loop_devices.attach(image, read_only=False)
    props = udev_properties(dev)
    assert (props["ID_FS_TYPE"], props["ID_FS_LABEL"]) == ("ext4", "personality-data")
    assert props[TEST_PROPERTY] == udev_token
    mnt = tmp_path / "data"
    mnt.mkdir()
    run("mount", dev, mnt)
    try:
        (mnt / "probe").write_text("ok")
        assert (mnt / "probe").read_text() == "ok"
    finally:
        unmount_tree(mnt)


def test_losetup_sends_change_events_and_never_remove(
    tmp_path: Path, loop_devices: LoopDevices, udev_monitor: UdevMonitor
) -> None:
    image = build_image(tmp_path, "ev", {"usr/bin/x": "x"}, fmt="erofs")
    dev = loop_devices.attach(image)
    event = udev_monitor.wait_for("change", dev, lambda e: "ID_FS_TYPE" in e.properties)
    assert event.properties["ID_FS_TYPE"] == "erofs"

    loop_devices.detach(dev)  # idle device: detached at once
    udev_monitor.wait_for("change", dev, lambda e: "ID_FS_TYPE" not in e.properties)
    time.sleep(0.3)
    mine = [e for e in udev_monitor.events() if e.devname == dev]
    assert [e.action for e in mine] == ["change"] * len(mine)
    assert "add" not in {e.action for e in mine}


def test_yank_busy_device_delivers_remove_and_frees_it_after_unmount(
    tmp_path: Path, loop_devices: LoopDevices, udev_monitor: UdevMonitor
) -> None:
    image = build_image(tmp_path, "busy", {"usr/bin/x": "busy\n"})
    dev = loop_devices.attach(image)
    mnt = tmp_path / "mnt"
    mount_ro(dev, mnt)
    try:
        loop_devices.yank(dev)
        removed = udev_monitor.wait_for("remove", dev)
        assert removed.properties["ID_FS_TYPE"] == "squashfs"
        # Busy: the kernel deferred the detach (autoclear); the mount keeps working.
        assert loop_backing_file(dev) == str(image)
        assert (mnt / "usr/bin/x").read_text() == "busy\n"
    finally:
        unmount_tree(mnt)
    # The last user is gone: the kernel clears the device and says so with `change`.
    udev_monitor.wait_for("change", dev, lambda e: "ID_FS_TYPE" not in e.properties)
    assert loop_backing_file(dev) != str(image)


def test_yank_idle_device_delivers_remove(
    tmp_path: Path, loop_devices: LoopDevices, udev_monitor: UdevMonitor
) -> None:
    image = build_image(tmp_path, "idle", {"usr/bin/x": "x"}, fmt="ext4", label="personality-i")
    dev = loop_devices.attach(image)
    loop_devices.yank(dev)
    removed = udev_monitor.wait_for("remove", dev)
    # Idle: `losetup -d` took effect at once and its `change` events already emptied udev's
    # record, so the `remove` carries no ID_FS_* any more (a busy device's `remove` does).
    assert "ID_FS_TYPE" not in removed.properties
    assert loop_backing_file(dev) != str(image)
    assert dev not in loop_devices.attached


@pytest.mark.usefixtures("udevd")
def test_loop_cleanup_detaches_only_what_is_still_ours(tmp_path: Path) -> None:
    loops = LoopDevices()
    image_a = build_image(tmp_path, "a", {"usr/bin/a": "a"})
    first = loops.attach(image_a)
    second = loops.attach(build_image(tmp_path, "b", {"usr/bin/b": "b"}))
    try:
        run("losetup", "-d", second)  # already gone behind the helper's back
        loops.cleanup()
    finally:
        for dev in (first, second):
            if loops.is_ours(dev):
                subprocess.run(["losetup", "-d", dev], check=False)
    assert loop_backing_file(first) != str(image_a)
    assert loops.attached == {}


def test_mounts_snapshot_and_unmount_tree(tmp_path: Path) -> None:
    before = mounts_snapshot()
    top = tmp_path / "top"
    top.mkdir()
    run("mount", "-t", "tmpfs", "pt-outer", top)
    (top / "inner").mkdir()
    run("mount", "-t", "tmpfs", "pt-inner", top / "inner")
    added = mounts_snapshot() - before
    assert added == {(str(top), "tmpfs", "pt-outer"), (str(top / "inner"), "tmpfs", "pt-inner")}
    unmount_tree(top)
    assert mounts_under(top) == []
    assert mounts_snapshot() == before


def test_sandbox_root_has_a_debian_base(sandbox_root: Path) -> None:
    assert (sandbox_root / "usr/bin/base-tool").read_bytes() == BASE_TOOL_BYTES
    for rel in ("etc/os-release", "usr/lib/os-release"):
        text = (sandbox_root / rel).read_text()
        assert "ID=debian\n" in text and 'VERSION_ID="12"\n' in text
    assert (sandbox_root / "etc/base.conf").is_file()


def test_journal_read_back(journal: JournalReader) -> None:
    from systemd import journal as sd_journal

    path = f"/usr/bin/probe-{uuid.uuid4().hex}"
    sd_journal.sendv(
        f"MESSAGE=Conflict on {path}: test entry",
        f"MESSAGE_ID={MESSAGE_ID_CONFLICT}",
        f"PERSONALITY_PATH={path}",
        "PERSONALITY_WINNER=web",
        "PERSONALITY_SHADOWED=datascience",
        "PERSONALITY_SHADOWED=base-tools",
        "PERSONALITY_IDENTICAL=0",
        "PRIORITY=4",
    )
    (entry,) = journal.entries(MESSAGE_ID_CONFLICT, PERSONALITY_PATH=path)
    assert entry["PERSONALITY_WINNER"] == "web"
    assert field_list(entry, "PERSONALITY_SHADOWED") == ["datascience", "base-tools"]
    assert entry["_PID"] == str(os.getpid())
    assert journal.entries(MESSAGE_ID_CONFLICT, PERSONALITY_PATH=path + "x", min_count=0) == []


def test_spool_request_protocol(tmp_path: Path) -> None:
    """Play the daemon's side of the spool protocol by hand."""
    spool = tmp_path / "root/var/spool/personalityd"
    for sub in ("done", "failed"):
        (spool / sub).mkdir(parents=True)
    seen: list[str] = []

    def fake_daemon() -> None:
        deadline = time.monotonic() + 120  # ends after two requests; this only bounds a failure
        while time.monotonic() < deadline and len(seen) < 2:
            for req in sorted(spool.glob("*.json")):
                body = json.loads(req.read_text())
                seen.append(req.name)
                where = "done" if body.get("action") == "attach" else "failed"
                status = "ok" if where == "done" else "error"
                req.rename(spool / where / req.name)
                tmp = spool / where / f".{req.stem}.result.json"
                tmp.write_text(json.dumps({"id": body.get("id"), "status": status}))
                tmp.rename(spool / where / f"{req.stem}.result.json")
            time.sleep(0.02)

    worker = threading.Thread(target=fake_daemon)
    worker.start()
    try:
        ok = spool_request(tmp_path / "root", {"action": "attach", "personality": "x", "id": "1"})
        bad = spool_request(tmp_path / "root", {"action": "nope"}, name="bad")
    finally:
        worker.join()
    assert ok == {"id": "1", "status": "ok", "_dir": "done"}
    assert bad == {"id": None, "status": "error", "_dir": "failed"}
    assert seen[1] == "bad.json"
    assert (spool / "failed/bad.json").is_file()


FAKE_DAEMON = textwrap.dedent(
    """
    import os, signal, sys, time, tomllib
    args = sys.argv[1:]
    cfg = tomllib.load(open(args[args.index("--config") + 1], "rb"))
    root = args[args.index("--root") + 1]
    assert cfg["root"] == root, (cfg["root"], root)
    for rel in (cfg["spool"]["dir"], cfg["state"]["dir"]):
        os.makedirs(os.path.join(root, rel.lstrip("/")), exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Ready only once the handlers are in place: a SIGTERM right after this must find them.
    print("event=daemon_ready match=" + repr(cfg["volumes"]["match"]), file=sys.stderr)
    while True:
        time.sleep(1)
    """
)


def test_daemon_helper_lifecycle(
    tmp_path: Path, daemon: Daemon, sandbox_root: Path, udev_token: str
) -> None:
    """Start/stop/kill9/restart against a stand-in `personalityd` module."""
    fake = tmp_path / "fake"
    (fake / "personalityd").mkdir(parents=True)
    (fake / "personalityd/__init__.py").write_text("")
    (fake / "personalityd/__main__.py").write_text(FAKE_DAEMON)
    daemon.env["PYTHONPATH"] = str(fake)

    daemon.start()
    assert daemon.spool_dir == sandbox_root / "var/spool/personalityd"
    assert daemon.spool_dir.is_dir() and daemon.state_dir.is_dir()
    assert udev_token in daemon.log_text()
    first = daemon.pid
    daemon.restart()
    assert daemon.pid != first and daemon.log_text().count("daemon_ready") == 2
    assert daemon.stop() == 0

    daemon.env["FAKE_IGNORE_TERM"] = "1"
    daemon.start()
    assert daemon.stop(timeout=1) == -9  # SIGTERM ignored: SIGKILL after the timeout
    daemon.start()
    daemon.kill9()
    assert not daemon.running()


def test_daemon_helper_reports_early_exit(daemon: Daemon, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "personalityd").mkdir(parents=True)
    (fake / "personalityd/__init__.py").write_text("")
    (fake / "personalityd/__main__.py").write_text("import sys\nsys.exit('bad config: x')\n")
    daemon.env["PYTHONPATH"] = str(fake)
    with pytest.raises(AssertionError, match=r"(?s)exited \(status 1\).*bad config: x"):
        daemon.start()


def test_fixtures_drive_the_real_daemon(
    tmp_path: Path,
    sandbox_root: Path,
    loop_devices: LoopDevices,
    daemon: Daemon,
    journal: JournalReader,
) -> None:
    """The fixtures end to end with the real daemon: volumes, spool, stacked files, journal."""
    manifest = {"ID": "debian", "VERSION_ID": "12", "IMAGE_VERSION": "1.0"}
    tool = "#!/bin/sh\necho tool from web\n"
    web = build_image(tmp_path, "web", {"usr/bin/tool": tool}, fmt="erofs", manifest=manifest)
    loop_devices.attach(build_writable_image(tmp_path), read_only=False)
    loop_devices.attach(web)
    before = mounts_snapshot()
    daemon.start()

    result = daemon.request({"action": "attach", "personality": "web", "id": "t1"})

    assert (result["_dir"], result["status"], result["id"]) == ("done", "ok", "t1")
    assert result["attached"] == ["web"]
    assert (sandbox_root / "usr/bin/tool").read_text() == tool
    assert (sandbox_root / "usr/bin/base-tool").read_bytes() == BASE_TOOL_BYTES
    assert (sandbox_root / "opt/personality/web/usr/bin/tool").is_file()
    assert daemon.pid is not None
    # Two changes: the upper stacked alone at start (the writable volume), then the attach.
    first, summary = journal.entries(MESSAGE_ID_STACK_CHANGED, min_count=2, _PID=daemon.pid)
    assert (first["PERSONALITY_ATTACHED"], first["PERSONALITY_CONFLICTS"]) == ("", "0")
    assert summary["PERSONALITY_ATTACHED"] == "web"
    assert summary["PERSONALITY_GENERATION"] == str(result["generation"])
    new_mounts = {mp for mp, _, _ in mounts_snapshot() - before}
    assert str(sandbox_root / "opt/personality/web") in new_mounts
    assert daemon.stop() == 0
