"""Volumes that misbehave: surprise removal during a switch, a name that comes back with other
content, corrupt filesystems, and hostile content (traversal names, os-release, symlinks out,
setuid files, device nodes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.contract import MESSAGE_ID_CONFLICT, MESSAGE_ID_VOLUME_REFUSED
from testkit.daemon import Daemon
from testkit.images import build_image
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.mounts import mountinfo
from testkit.polling import wait_for
from testkit.sandbox import OS_RELEASE
from testkit.stack import desired_of, expect_stack, files_of


def test_surprise_removal_during_switches(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    names = ["r1", "r2", "r3"]
    trees = {n: files_of(n, 300, shared=["usr/bin/rtool"]) for n in names}
    devs = {n: loop_devices.attach(build_image(tmp_path, n, trees[n])) for n in names}
    daemon.start()
    assert daemon.request({"action": "switch", "personalities": ["r1", "r2"]})["status"] == "ok"

    results: list[dict[str, object]] = []

    def switches() -> None:
        for i in range(20):
            stack = ["r1", "r2", "r3"] if i % 2 == 0 else ["r3", "r2", "r1"]
            results.append(daemon.request({"action": "switch", "personalities": stack}))

    worker = threading.Thread(target=switches)
    worker.start()
    wait_for(lambda: bool(results), 120, "the first switch")  # then r2 vanishes among them
    loop_devices.yank(devs["r2"])
    worker.join(timeout=600)
    assert not worker.is_alive()
    assert daemon.running()
    # Requests naming r2 after it vanished fail cleanly; none is left unanswered.
    assert len(results) == 20
    for result in results:
        assert result["status"] in ("ok", "error"), result
    desired = desired_of(daemon)
    live = [n for n in desired if n != "r2"]
    wait_for(lambda: _live(daemon) == live, 120, "the stack without r2")
    expect_stack(daemon, live, {n: trees[n] for n in names})
    # r2 comes back: stacked again in its place.
    loop_devices.attach(build_image(tmp_path, "r2", trees["r2"]))
    if "r2" in desired:
        wait_for(lambda: _live(daemon) == desired, 120, "r2 back in its place")
        expect_stack(daemon, desired, trees)


def _live(daemon: Daemon) -> list[str]:
    path = daemon.runtime_dir / "conflicts.json"
    import json

    try:
        return list(json.loads(path.read_text())["attached"])
    except (OSError, ValueError, KeyError):
        return []


def test_reappearing_name_with_other_content_is_indexed_again(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    base = files_of("keep", 20)
    loop_devices.attach(build_image(tmp_path, "keep", base))
    v1 = files_of("re", 20)
    dev = loop_devices.attach(build_image(tmp_path, "re", v1))
    daemon.start()
    result = daemon.request({"action": "switch", "personalities": ["keep", "re"]})
    assert result["status"] == "ok", result
    expect_stack(daemon, ["keep", "re"], {"keep": base, "re": v1})
    loop_devices.yank(dev)
    wait_for(lambda: _live(daemon) == ["keep"], 120, "re gone")
    # Same name, other content: other bytes, and a new file that conflicts with 'keep'.
    v2 = {rel: b"v2 " + data for rel, data in v1.items()}
    v2["etc/keep.conf"] = b"re v2 overrides keep\n"
    loop_devices.attach(build_image(tmp_path, "re", v2))
    wait_for(lambda: _live(daemon) == ["keep", "re"], 120, "re back")
    expect_stack(daemon, ["keep", "re"], {"keep": base, "re": v2})
    assert not (daemon.root / "usr/share/re/f000").read_bytes().startswith(b"re file")
    entries = journal.entries(MESSAGE_ID_CONFLICT, PERSONALITY_PATH="/etc/keep.conf", timeout=60)
    assert entries and entries[-1]["PERSONALITY_WINNER"] == "re", entries


def _corrupt_images(tmp_path: Path) -> dict[str, Path]:
    good = files_of("good", 2000)
    truncated = build_image(tmp_path, "trunc", files_of("trunc", 2000))
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 3)
    garbage = build_image(tmp_path, "garbage", files_of("garbage", 50))
    with open(garbage, "r+b") as f:
        f.write(os.urandom(4096))
    return {"good": build_image(tmp_path, "good", good), "trunc": truncated, "garbage": garbage}


def test_corrupt_volumes_are_refused_and_never_stacked(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    images = _corrupt_images(tmp_path)
    devs = {
        n: loop_devices.attach(img) if n == "good" else _attach_raw(loop_devices, img)
        for n, img in images.items()
    }
    daemon.start()
    # The garbage superblock is refused at probe time; the truncated squashfs may mount and
    # fail only when read: attaching it must fail without changing anything.
    refused = journal.entries(
        MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=devs["garbage"], timeout=60
    )
    assert refused, "no journal entry for the garbage superblock"
    assert daemon.request({"action": "attach", "personality": "good"})["status"] == "ok"
    result = daemon.request({"action": "attach", "personality": "trunc"})
    assert result["status"] == "error", result
    assert result["attached"] == ["good"], result
    entries = journal.entries(MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=devs["trunc"])
    assert entries, "no journal entry for the truncated image"
    assert "trunc" not in desired_of(daemon)
    expect_stack(daemon, ["good"], {"good": files_of("good", 2000)})
    for mp, fstype, source in mountinfo():
        assert source not in (devs["trunc"], devs["garbage"]) or not mp.startswith(
            str(daemon.root)
        ), (mp, fstype, source)


def _attach_raw(loop_devices: LoopDevices, image: Path) -> str:
    """Attach without waiting for ID_FS_TYPE (a garbage superblock never gets one)."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    loop_devices.attached[dev] = image.resolve()
    subprocess.run(["udevadm", "settle"], check=True)
    return dev


# --------------------------------------------------------------------------------------------
# hostile volumes


def test_manifest_name_traversal_is_refused(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    src = tmp_path / "trav.tree"
    (src / "usr/lib/extension-release.d").mkdir(parents=True)
    (src / "usr/lib/extension-release.d/extension-release...").write_text("ID=_any\n")
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/trav").write_text("x")
    image = tmp_path / "trav.squashfs"
    subprocess.run(["mksquashfs", src, image, "-quiet", "-no-progress", "-all-root"], check=True)
    dev = loop_devices.attach(image)
    daemon.start()
    assert journal.entries(MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=dev, timeout=60)
    result = daemon.request({"action": "attach", "personality": ".."})
    assert result["status"] == "error" and result["code"] == "invalid-name", result
    assert not any(mp.startswith(str(daemon.root)) for mp, _, src_ in mountinfo() if src_ == dev)
    assert not (daemon.root / "usr/bin/trav").exists()


def test_os_release_inside_an_image_does_not_change_the_base(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    hostile = "ID=evil\nVERSION_ID=666\n"
    files = {"usr/lib/os-release": hostile, "etc/os-release": hostile, "usr/bin/osr": "x"}
    dev = loop_devices.attach(build_image(tmp_path, "osr", files))
    daemon.start()
    assert journal.entries(MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=dev, timeout=60)
    result = daemon.request({"action": "attach", "personality": "osr"})
    if result["status"] == "ok":
        # Stacked: the base's identity must still be what the stacked system reports.
        assert (daemon.root / "usr/lib/os-release").read_text() == OS_RELEASE
        assert (daemon.root / "etc/os-release").read_text() == OS_RELEASE
    else:
        # os-release is a protected path: listed, refused as incompatible, even forced
        assert result["code"] == "incompatible", result
        assert "os-release" in result["message"], result
        assert not (daemon.root / "usr/bin/osr").exists()


def test_symlinks_out_of_the_volume_are_not_followed_by_the_daemon(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    src = tmp_path / "sym.tree"
    (src / "usr/lib").mkdir(parents=True)
    # The manifest directory itself is a symlink to a host directory with a manifest in it.
    host_manifests = tmp_path / "host-release.d"
    host_manifests.mkdir()
    (host_manifests / "extension-release.sym").write_text(
        f'ID=_any\nPERSONALITY_DESCRIPTION="{secret.read_text().strip()}"\n'
    )
    (src / "usr/lib/extension-release.d").symlink_to(host_manifests)
    image = tmp_path / "sym.squashfs"
    subprocess.run(["mksquashfs", src, image, "-quiet", "-no-progress", "-all-root"], check=True)
    dev = loop_devices.attach(image)
    # A second volume whose files are symlinks pointing outside, conflicting with a file.
    links = {
        "usr/share/out/abs": ("symlink", str(secret)),
        "usr/share/out/rel": ("symlink", "../../../../../../../../" + str(secret)),
        "usr/bin/clash": ("symlink", str(secret)),
    }
    loop_devices.attach(build_image(tmp_path, "links", links))
    loop_devices.attach(build_image(tmp_path, "plain", {"usr/bin/clash": "plain\n"}))
    daemon.start()
    result = daemon.request({"action": "attach", "personality": "sym"})
    assert result["status"] == "error", f"manifest read through a symlink out of {dev}: {result}"
    assert "host secret" not in daemon.log_text()
    ok = daemon.request({"action": "switch", "personalities": ["plain", "links"]})
    assert ok["status"] == "ok", ok
    report = (daemon.runtime_dir / "conflicts.json").read_text()
    assert "/usr/bin/clash" in report and "host secret" not in report
    # Through the stack the links are links (resolved by the reader, as any symlink is).
    assert os.readlink(daemon.root / "usr/share/out/abs") == str(secret)


SUID_IMAGE_TOOL = "/usr/bin/id"


def test_setuid_files_do_not_run_setuid_through_the_stack(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    """With the default volume options (nosuid), a set-id file of a volume must not run set-id
    through the stack: either the volume is refused (journalled, never stacked) or the stack
    neutralises the bit. (Overlayfs honours only the overlay mount's own nosuid.)"""
    tool = Path(SUID_IMAGE_TOOL).read_bytes()
    files = {
        "usr/bin/suid-id": ("file", tool, 0o4755),
        "usr/bin/sgid-id": ("file", tool, 0o2755),
    }
    dev = loop_devices.attach(build_image(tmp_path, "suid", files))
    daemon.start()
    result = daemon.request({"action": "attach", "personality": "suid"})
    if result["status"] != "ok":
        refused = journal.entries(MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=dev, timeout=60)
        assert refused and "set-id" in refused[-1]["PERSONALITY_REASON"], refused
        assert not (daemon.root / "usr/bin/suid-id").exists()
        return
    for name, flag in (("suid-id", "-u"), ("sgid-id", "-g")):
        path = daemon.root / "usr/bin" / name
        assert path.stat().st_mode & 0o6000, "the image lost its set-id bit: test is void"
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(path), flag],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == "65534", f"{name} ran with effective id {out} through the stack"


def test_setuid_files_are_allowed_when_the_admin_drops_nosuid(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    tool = Path(SUID_IMAGE_TOOL).read_bytes()
    loop_devices.attach(build_image(tmp_path, "suid2", {"usr/bin/suid2": ("file", tool, 0o4755)}))
    daemon.update_config({"volumes": {"mount_options": ["ro", "nodev"]}})
    daemon.start()
    result = daemon.request({"action": "attach", "personality": "suid2"})
    assert result["status"] == "ok", result
    assert (daemon.root / "usr/bin/suid2").stat().st_mode & 0o4000


def test_device_nodes_in_a_volume_are_not_usable(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    files = {"usr/share/dev/null": ("chardev", 1, 3), "usr/share/dev/zero": ("chardev", 1, 5)}
    loop_devices.attach(build_image(tmp_path, "devs", files))
    # Under nodev (the default) such a volume is refused (tests/integration/
    # test_hostile_volumes.py); without it the nodes are stacked, and still not usable.
    daemon.update_config({"volumes": {"mount_options": ["ro", "nosuid"]}})
    daemon.start()
    assert daemon.request({"action": "attach", "personality": "devs"})["status"] == "ok"
    for node in ("null", "zero"):
        path = daemon.root / "usr/share/dev" / node
        assert path.is_char_device()
        with pytest.raises(PermissionError):
            os.open(path, os.O_RDONLY)


@pytest.fixture(autouse=True)
def _no_stray_trees(tmp_path: Path) -> Iterator[None]:
    # build_image leaves its source trees in tmp_path/images; nothing to clean but keep the
    # disk use of a long run bounded.
    yield
    for tree in (tmp_path / "images").glob("*.tree"):
        shutil.rmtree(tree, ignore_errors=True)
