"""A personality volume is never written: its image's bytes are the same before and after the
daemon probes it, attaches it, detaches it, is killed with -9 while it is attached, and starts
again and adopts it (docs/configuration.md, volumes.mount_options; docs/architecture.md).

The images are built to need a replay (an ext4 journal that needs recovery, an xfs log left
dirty, a btrfs log tree; `testkit.replay`), or by a hostile author to make any writable mount
write (an ext4 orphan list), and are attached as writable loop devices, so that only the
daemon's own care keeps them unchanged: the kernel's read-only flag (`BLKROSET`), which the
test reads back, and each filesystem's no-replay mount option. Devices that someone else has
mounted keep their flag and their writer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_view import REFUSED, ok, read, wait_until

from personalityd.adapters import blockdev
from testkit.daemon import Daemon
from testkit.images import build_image, build_writable_image, pack_image, write_tree
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.mounts import unmount_tree
from testkit.processes import run, stop_process
from testkit.replay import REPLAY_FORMATS, add_orphan, build_replay_image, sha256

# The mount option that each filesystem must show on the volume mount (findmnt OPTIONS).
NO_REPLAY_SHOWN = {"ext4": "norecovery", "xfs": "norecovery", "btrfs": "rescue=nologreplay"}


def kernel_read_only(dev: str) -> bool:
    """`blockdev --getro DEV`: the kernel's read-only flag, as an administrator reads it."""
    return run("blockdev", "--getro", dev).strip() == "1"


def device_busy(dev: str) -> bool:
    """True while a filesystem (a mount, also a lazily unmounted one) still holds `dev`."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def mount_options(path: Path) -> set[str]:
    out = run("findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(path))
    return set(out.strip().split(","))


def volume_found(daemon: Daemon, name: str) -> bool:
    return f"event=volume_found name={name}" in daemon.log_text()


@pytest.mark.parametrize("fmt", REPLAY_FORMATS)
def test_volume_that_needs_replay_is_never_written(
    fmt: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    name = f"replay-{fmt}"
    data = f"usr/share/{name}/data.txt"
    content = f"{fmt} content, written before the crash\n".encode()
    img = build_replay_image(tmp_path, name, {data: content, f"etc/{name}.conf": "conf\n"}, fmt)
    before = sha256(img)
    dev = loop_devices.attach(img, read_only=False)
    assert not kernel_read_only(dev)  # writable until the daemon sees it

    daemon.start()  # coldplug probes the device before the daemon is ready
    assert volume_found(daemon, name), daemon.log_text()[-3000:]
    assert sha256(img) == before, "probe wrote to the image"
    assert kernel_read_only(dev)
    assert Path(f"/sys/block/{Path(dev).name}/ro").read_text().strip() == "1"

    ok(daemon.request({"action": "attach", "personality": name}))
    assert read(sandbox_root, data) == content
    assert read(sandbox_root, f"etc/{name}.conf") == b"conf\n"
    volume = daemon.mount_root / name
    assert {"ro", NO_REPLAY_SHOWN[fmt]} <= mount_options(volume)
    assert sha256(img) == before, "attach wrote to the image"

    ok(daemon.request({"action": "detach", "personality": name}))
    assert not (sandbox_root / data).exists()
    wait_until(lambda: not device_busy(dev), daemon)  # the superblock is gone
    assert sha256(img) == before, "detach wrote to the image"

    ok(daemon.request({"action": "attach", "personality": name}))
    daemon.kill9()
    assert read(sandbox_root, data) == content
    assert sha256(img) == before, "attach after detach, or kill -9, wrote to the image"

    daemon.start()  # adopts the mounted volume and stack
    assert read(sandbox_root, data) == content
    assert sha256(img) == before, "restart wrote to the image"
    ok(daemon.request({"action": "detach", "personality": name}))
    daemon.stop()
    wait_until(lambda: not device_busy(dev), daemon)
    assert kernel_read_only(dev)
    assert sha256(img) == before, "detach after restart wrote to the image"


def test_ext4_orphan_list_is_not_cleaned_up(
    daemon: Daemon, loop_devices: LoopDevices, sandbox_root: Path, tmp_path: Path
) -> None:
    """An orphan inode in the superblock makes ext4 truncate it at mount time, even with
    `ro,norecovery` (found by experiment: "1 truncate cleaned up", the image changed); on a
    device the kernel holds read-only it skips the cleanup."""
    victim = "usr/share/orphan/victim"
    img = build_image(tmp_path, "orphan", {victim: b"still here\n" * 100}, "ext4")
    add_orphan(img, victim)
    before = sha256(img)
    dev = loop_devices.attach(img, read_only=False)

    daemon.start()
    assert volume_found(daemon, "orphan"), daemon.log_text()[-3000:]
    assert sha256(img) == before, "probe cleaned up the orphan inode"
    assert kernel_read_only(dev)
    ok(daemon.request({"action": "attach", "personality": "orphan"}))
    assert read(sandbox_root, victim) == b"still here\n" * 100
    assert sha256(img) == before, "attach cleaned up the orphan inode"
    ok(daemon.request({"action": "detach", "personality": "orphan"}))
    daemon.stop()
    wait_until(lambda: not device_busy(dev), daemon)
    assert sha256(img) == before


def _disk_of(tmp_path: Path, volume: Path, writable: Path) -> tuple[Path, int, int]:
    """One disk image holding `volume` at 1 MiB and `writable` after it (byte copies), as
    two partitions would; returns the disk, the writable's offset and the volume's size."""
    disk = tmp_path / "images/disk.img"
    mib = 1 << 20
    size = volume.stat().st_size
    with open(disk, "wb") as f:
        f.truncate(mib + size + writable.stat().st_size)
    for image, start in ((volume, mib), (writable, mib + size)):
        run(
            "dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={start // mib}",
            "conv=notrunc,sparse", "status=none",
        )  # fmt: skip
    return disk, mib + size, size


def _sha256_range(path: Path, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, f"{path} ends before {offset + size}"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def test_flag_is_per_device_and_never_on_the_writable_volume(
    daemon: Daemon, loop_devices: LoopDevices, sandbox_root: Path, tmp_path: Path
) -> None:
    """A btrfs volume with a log tree and the writable volume side by side in one disk image,
    each its own loop device over its byte range (this kernel has no partition tables): the
    volume's device is made read-only, the writable one's never, and writes land there."""
    volume = build_replay_image(tmp_path, "beside", {"usr/share/beside/x": "x\n"}, "btrfs")
    writable = build_writable_image(tmp_path)
    disk, writable_at, size = _disk_of(tmp_path, volume, writable)
    mib = 1 << 20
    before = _sha256_range(disk, mib, size)
    assert before == sha256(volume)
    dev = loop_devices.attach(disk, read_only=False, byte_range=(mib, size))
    data = loop_devices.attach(
        disk, read_only=False, byte_range=(writable_at, writable.stat().st_size)
    )

    daemon.start()
    assert volume_found(daemon, "beside"), daemon.log_text()[-3000:]
    assert "event=writable_found" in daemon.log_text()
    assert _sha256_range(disk, mib, size) == before, "probe wrote to the volume"
    assert (kernel_read_only(dev), kernel_read_only(data)) == (True, False)
    ok(daemon.request({"action": "attach", "personality": "beside"}))
    assert read(sandbox_root, "usr/share/beside/x") == b"x\n"
    (sandbox_root / "usr/share/beside/local").write_text("on the writable volume\n")
    upper = daemon.runtime_dir / "writable/upper/_usr/share/beside/local"
    assert upper.read_text() == "on the writable volume\n"
    assert not kernel_read_only(data)
    ok(daemon.request({"action": "detach", "personality": "beside"}))
    daemon.stop()
    wait_until(lambda: not device_busy(dev), daemon)
    assert _sha256_range(disk, mib, size) == before


def _ext4_volume(tmp_path: Path, name: str) -> Path:
    src = tmp_path / f"{name}.tree"
    write_tree(src, {f"usr/share/{name}/data": f"{name}\n"})
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True)
    release.write_text('ID="_any"\n')
    image = tmp_path / f"{name}.ext4"
    pack_image(src, image, "ext4")
    return image


def test_device_mounted_elsewhere_keeps_its_flag_and_its_writer(
    daemon: Daemon, loop_devices: LoopDevices, sandbox_root: Path, tmp_path: Path
) -> None:
    """A volume that its owner has mounted read-write is read and bound from that mount; its
    device is not made read-only, and the owner's mount keeps working."""
    dev = loop_devices.attach(_ext4_volume(tmp_path, "shared"), read_only=False)
    owner = tmp_path / "owner"
    owner.mkdir()
    run("mount", dev, owner)
    try:
        daemon.start()
        assert volume_found(daemon, "shared"), daemon.log_text()[-3000:]
        ok(daemon.request({"action": "attach", "personality": "shared"}))
        assert read(sandbox_root, "usr/share/shared/data") == b"shared\n"
        assert not kernel_read_only(dev)
        (owner / "usr/share/shared/data").write_text("changed by its owner\n")
        os.sync()
        assert read(sandbox_root, "usr/share/shared/data") == b"changed by its owner\n"
        ok(daemon.request({"action": "detach", "personality": "shared"}))
    finally:
        daemon.stop()
        unmount_tree(owner)


@pytest.fixture
def held_elsewhere(loop_devices: LoopDevices, tmp_path: Path) -> Iterator[str]:
    """An ext4 volume mounted read-write in another mount namespace, by a process of ours
    that writes to it when told (a line on its stdin), then unmounts it and exits 0."""
    dev = loop_devices.attach(_ext4_volume(tmp_path, "hidden"), read_only=False)
    mnt = tmp_path / "hidden-mnt"
    mnt.mkdir()
    script = (
        'mount "$0" "$1" && echo mounted && read -r _ && echo w > "$1/w" && sync && umount "$1"'
    )
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, dev, str(mnt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "mounted\n"
        holder.stdout.close()
        yield dev
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0, "the owner's read-write mount was broken"
    finally:
        stop_process(holder, timeout=10)


def test_device_held_where_the_daemon_cannot_see_is_refused(
    daemon: Daemon,
    held_elsewhere: str,
    journal: JournalReader,
) -> None:
    """Mounted in another mount namespace: no mount to read through, and setting the flag
    would break the owner's writes. The volume is refused, the device left as it is."""
    dev = held_elsewhere
    assert device_busy(dev)
    daemon.start()
    entry = journal.entries(REFUSED, _PID=str(daemon.pid), PERSONALITY_DEVICE=dev, timeout=60)[0]
    assert "is in use elsewhere" in entry["PERSONALITY_REASON"], entry
    assert "not mounted" in entry["PERSONALITY_REASON"]
    assert not kernel_read_only(dev)
    result = daemon.request({"action": "attach", "personality": "hidden"})
    assert (result["_dir"], result["code"]) == ("failed", "no-such-personality")
    assert not (daemon.mount_root / "hidden").exists()


def test_read_only_adapter_names_what_failed(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        blockdev.make_read_only("/dev/null")
    assert exc.value.errno == errno.ENOTBLK
    assert exc.value.strerror == "/dev/null is not a block device; it is not mounted"
    missing = str(tmp_path / "gone")
    with pytest.raises(OSError) as exc:
        blockdev.make_read_only(missing)
    assert exc.value.strerror == (
        f"cannot make {missing} read-only (cannot open it: No such file or directory); "
        "it is not mounted"
    )



def test_read_only_writable_volume_is_named_and_left_alone(
    daemon: Daemon, loop_devices: LoopDevices, sandbox_root: Path, tmp_path: Path
) -> None:
    """A writable volume the kernel holds read-only (an administrator's `blockdev --setro`,
    or a loop device that was a volume before) is not used, with the flag as the reason in the
    log instead of the kernel's bare "Permission denied"; the daemon does not clear it."""
    loop_devices.attach(build_image(tmp_path, "over-ro", {"usr/share/over-ro/x": "x\n"}))
    data = loop_devices.attach(build_writable_image(tmp_path), read_only=False)
    run("blockdev", "--setro", data)
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "over-ro"}))
    line = f"event=writable_mount_failed device={data} error="
    log = daemon.log_text()
    assert line in log, log[-3000:]
    assert f"{data} is read-only in the kernel (blockdev --getro)" in log
    assert read(sandbox_root, "usr/share/over-ro/x") == b"x\n"
    with pytest.raises(OSError) as exc:  # writable.fallback = "none": a read-only stack
        (sandbox_root / "usr/share/over-ro/new").write_text("x")
    assert exc.value.errno == errno.EROFS
    assert kernel_read_only(data)
