"""adapters.loopdev and adapters.imageformat on real loop devices and real images.

A loop device made from an open file is read-only, autoclear and backed by that file, shows the
file's bytes (or a partition's byte range, found in the GPT by imageformat), refuses writes, and
goes away when its descriptor is closed, or, when it is mounted, at the unmount. Failures leave
no descriptor open and no loop device configured.

The machine is shared: other sessions attach loop devices of their own at any time. So "nothing
left behind" is judged by the loop devices backed by this test's files (`losetup --json` rows
whose backing file is under tmp_path) and by this process's open descriptors, never by the whole
`losetup` list.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from personalityd.adapters import loopdev
from personalityd.adapters.imageformat import ImageFormatError, ImageLayout, detect_layout
from personalityd.adapters.loopdev import LoopDevice, attach_read_only, loop_status
from testkit.ddi import FILLER_PATTERN, build_disk_image, partition_offsets
from testkit.images import build_image, pack_image, write_tree
from testkit.mounts import mountinfo, unmount_tree
from testkit.polling import wait_for
from testkit.processes import run

RELEASE_TIMEOUT = 60  # s; a udevd probing the new device may hold it open for a while

FILES = {
    "usr/lib/extension-release.d/extension-release.web": "ID=_any\n",
    "usr/bin/web": "#!/bin/sh\necho web\n",
    "usr/share/web/data.txt": "payload " * 1000,
}


# -- helpers ---------------------------------------------------------------------------------


def losetup_rows(device: str | None = None) -> list[dict[str, Any]]:
    args = ["losetup", "--json", "--list"] + ([device] if device else [])
    out = run(*args).strip()
    rows: list[dict[str, Any]] = json.loads(out)["loopdevices"] if out else []
    return rows


def rows_backed_under(directory: Path) -> list[dict[str, Any]]:
    """`losetup --json` rows of loop devices whose backing file is under `directory`."""
    prefix = str(directory.resolve()) + "/"
    return [row for row in losetup_rows() if (row.get("back-file") or "").startswith(prefix)]


def open_fds() -> set[str]:
    """This process's open descriptors and what they are, as /proc/self/fd shows them."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used
            found.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
    return found


def still_ours(device: LoopDevice) -> bool:
    status = loop_status(device.devnode)
    return status is not None and status.diskseq == device.diskseq


def wait_released(device: LoopDevice) -> None:
    wait_for(
        lambda: not still_ours(device),
        timeout=RELEASE_TIMEOUT,
        what=f"the kernel to release {device.devnode}",
    )


def filesystem_type(path: Path) -> str:
    return run("findmnt", "--noheadings", "--output", "FSTYPE", "--target", path).strip()


def read_device(devnode: str) -> bytes:
    with open(devnode, "rb") as f:
        return f.read()


class Attached:
    """Loop devices a test attached: after it, their mounts are removed, their descriptors
    closed, and each is released (by the kernel, or detached by hand if the code failed)."""

    def __init__(self) -> None:
        self.devices: list[LoopDevice] = []
        self.descriptors: list[int] = []

    def attach(self, image: Path, **kw: Any) -> tuple[LoopDevice, int]:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            device, loop_fd = attach_read_only(fd, **kw)
        finally:
            os.close(fd)  # the loop device holds the file itself
        self.adopt(device, loop_fd)
        return device, loop_fd

    def adopt(self, device: LoopDevice, loop_fd: int) -> None:
        self.devices.append(device)
        self.descriptors.append(loop_fd)

    def release(self, loop_fd: int) -> None:
        self.descriptors.remove(loop_fd)
        os.close(loop_fd)

    def cleanup(self) -> None:
        ours = {device.devnode for device in self.devices}
        for mount_point, _, source in reversed(mountinfo()):
            if source in ours:
                subprocess.run(["umount", "--lazy", mount_point], capture_output=True)
        for fd in self.descriptors:
            os.close(fd)
        self.descriptors.clear()
        try:
            wait_for(
                lambda: not any(still_ours(device) for device in self.devices),
                timeout=RELEASE_TIMEOUT,
                what="the loop devices of this test to be released",
            )
        finally:
            for device in self.devices:
                if still_ours(device):
                    subprocess.run(["losetup", "-d", device.devnode], capture_output=True)


def detach_leftovers(directory: Path) -> None:
    """`losetup -d` the loop devices still backed by files under `directory` (only when the
    code under test failed to release them: they are ours by their backing file)."""
    for row in rows_backed_under(directory):
        subprocess.run(["losetup", "-d", row["name"]], capture_output=True, check=False)


@pytest.fixture
def loops() -> Iterator[Attached]:
    attached = Attached()
    try:
        yield attached
    finally:
        attached.cleanup()


@pytest.fixture
def squashfs_image(tmp_path: Path) -> Path:
    return build_image(tmp_path, "web", FILES)


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        yield target
    finally:
        unmount_tree(target)


# -- attach_read_only ------------------------------------------------------------------------


def test_attach_from_a_descriptor(tmp_path: Path, loops: Attached, squashfs_image: Path) -> None:
    assert rows_backed_under(tmp_path) == []
    st = squashfs_image.stat()

    device, loop_fd = loops.attach(squashfs_image)

    (row,) = losetup_rows(device.devnode)
    assert row["ro"] is True
    assert row["autoclear"] is True
    assert row["back-file"] == str(squashfs_image.resolve())
    assert row["offset"] == 0 and row["sizelimit"] == 0
    assert row["dio"] is device.direct_io
    if filesystem_type(tmp_path) in ("ext4", "xfs"):
        assert device.direct_io, "direct I/O works on ext4 and xfs at offset 0"
    assert device.backing == (st.st_dev, st.st_ino)
    assert (device.offset, device.size) == (0, 0)
    rdev = os.stat(device.devnode).st_rdev
    assert device.devnum == (os.major(rdev), os.minor(rdev))
    assert os.fstat(loop_fd).st_rdev == rdev
    assert device.diskseq > 0
    assert Path(f"/sys/block/{Path(device.devnode).name}/diskseq").read_text().strip() == str(
        device.diskseq
    )
    assert read_device(device.devnode) == squashfs_image.read_bytes()
    assert run("blockdev", "--getro", device.devnode).strip() == "1"
    assert os.get_inheritable(loop_fd) is False

    loops.release(loop_fd)
    wait_released(device)
    assert rows_backed_under(tmp_path) == []


def test_writing_to_the_loop_device_fails(loops: Attached, squashfs_image: Path) -> None:
    device, _ = loops.attach(squashfs_image)
    before = squashfs_image.read_bytes()
    with pytest.raises(OSError) as caught:  # the open or the write may refuse
        fd = os.open(device.devnode, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert caught.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert squashfs_image.read_bytes() == before


def test_the_block_device_view(loops: Attached, squashfs_image: Path) -> None:
    device, _ = loops.attach(squashfs_image)
    block = device.block_device("squashfs")
    assert block.devnode == device.devnode
    assert block.devnum == device.devnum
    assert block.diskseq == device.diskseq
    assert block.fs_type == "squashfs"
    assert dict(block.properties) == {
        "ID_FS_TYPE": "squashfs",
        "DEVNAME": device.devnode,
        "DISKSEQ": str(device.diskseq),
    }
    assert block.identity == f"{device.devnum[0]}:{device.devnum[1]}:{device.diskseq}"


def test_without_direct_io(loops: Attached, squashfs_image: Path) -> None:
    device, _ = loops.attach(squashfs_image, direct_io=False)
    assert device.direct_io is False
    (row,) = losetup_rows(device.devnode)
    assert row["dio"] is False and row["ro"] is True and row["autoclear"] is True
    assert read_device(device.devnode) == squashfs_image.read_bytes()


def test_direct_io_is_dropped_for_an_unaligned_offset(loops: Attached, tmp_path: Path) -> None:
    image = tmp_path / "unaligned.img"
    image.write_bytes(os.urandom(64 << 10))
    device, _ = loops.attach(image, offset=100, size=4096)
    assert device.direct_io is False
    (row,) = losetup_rows(device.devnode)
    assert (row["offset"], row["sizelimit"], row["dio"]) == (100, 4096, False)
    assert read_device(device.devnode) == image.read_bytes()[100 : 100 + 4096]


def test_a_gpt_partition_byte_range(tmp_path: Path, loops: Attached, mount_point: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw")
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        layout = detect_layout(fd, "x86-64", disk.name)
    finally:
        os.close(fd)
    assert (layout.offset, layout.size) == partition_offsets(disk)[1]
    assert layout.fs_type == "squashfs" and layout.tree == "root"

    device, _ = loops.attach(disk, offset=layout.offset, size=layout.size)

    (row,) = losetup_rows(device.devnode)
    assert (row["offset"], row["sizelimit"], row["ro"]) == (layout.offset, layout.size, True)
    assert (device.offset, device.size) == (layout.offset, layout.size)
    content = disk.read_bytes()
    assert read_device(device.devnode) == content[layout.offset : layout.offset + layout.size]
    run("mount", "-o", "ro", "-t", layout.fs_type, device.devnode, mount_point)
    assert (mount_point / "usr/bin/web").read_text() == FILES["usr/bin/web"]
    assert (mount_point / "usr/share/web/data.txt").read_text() == FILES["usr/share/web/data.txt"]


def test_a_usr_partition_of_erofs(tmp_path: Path, loops: Attached, mount_point: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw", kind="usr", fs="erofs")
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        layout = detect_layout(fd, "x86-64", disk.name)
        device, loop_fd = attach_read_only(fd, offset=layout.offset, size=layout.size)
    finally:
        os.close(fd)
    loops.adopt(device, loop_fd)
    assert (layout.fs_type, layout.tree, layout.partition_label) == ("erofs", "usr", "usr-x86-64")
    run("mount", "-o", "ro", "-t", "erofs", device.devnode, mount_point)
    assert (mount_point / "bin/web").read_text() == FILES["usr/bin/web"]


def test_a_mounted_loop_stays_until_the_unmount(
    loops: Attached, squashfs_image: Path, mount_point: Path
) -> None:
    device, loop_fd = loops.attach(squashfs_image)
    run("mount", "-o", "ro", "-t", "squashfs", device.devnode, mount_point)

    loops.release(loop_fd)

    assert (mount_point / "usr/bin/web").read_text() == FILES["usr/bin/web"]
    assert still_ours(device)
    (row,) = losetup_rows(device.devnode)
    assert row["back-file"] == str(squashfs_image.resolve())
    run("umount", mount_point)
    wait_released(device)


# -- loop_status -----------------------------------------------------------------------------


def test_loop_status_of_our_device(loops: Attached, squashfs_image: Path) -> None:
    device, _ = loops.attach(squashfs_image, offset=4096)
    status = loop_status(device.devnode)
    assert status is not None
    assert status.backing == device.backing
    assert (status.offset, status.size, status.diskseq) == (4096, 0, device.diskseq)
    assert status.read_only and status.autoclear
    assert status.direct_io is device.direct_io
    assert not status.flags & loopdev.LO_FLAGS_PARTSCAN
    assert status.backing_file == str(squashfs_image.resolve())
    assert loopdev.is_read_only_loop(device.devnode)


def free_loop_number() -> int:
    control = os.open(loopdev.LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        number: int = fcntl.ioctl(control, loopdev.LOOP_CTL_GET_FREE)
        return number
    finally:
        os.close(control)


def test_loop_status_of_an_unconfigured_device() -> None:
    # A free device may be taken by another process between the two steps; a few tries.
    for _ in range(20):
        number = free_loop_number()
        if loop_status(f"/dev/loop{number}") is None:
            assert not loopdev.is_read_only_loop(f"/dev/loop{number}")
            return
    pytest.fail("every free loop device was taken before it could be looked at")


def test_loop_status_of_what_is_not_a_loop_device(tmp_path: Path) -> None:
    assert loop_status(str(tmp_path / "no-such-device")) is None
    with pytest.raises(OSError, match="/dev/null is not a loop device"):
        loop_status("/dev/null")


# -- failures leak nothing -------------------------------------------------------------------


def failing_descriptors(tmp_path: Path) -> dict[str, Callable[[], int]]:
    image = tmp_path / "file.img"
    image.write_bytes(bytes(64 << 10))

    def closed() -> int:
        fd = os.open(image, os.O_RDONLY)
        os.close(fd)
        return fd

    def pipe_end() -> int:
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end

    return {
        "closed": closed,
        "directory": lambda: os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "writable": lambda: os.open(image, os.O_RDWR),
        "pipe": pipe_end,
        "proc": lambda: os.open("/proc/self/status", os.O_RDONLY),  # the kernel refuses it
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("closed", "is not open"),
        ("directory", "neither a regular file nor a block device"),
        ("writable", "open for writing"),
        ("pipe", "neither a regular file nor a block device"),
        ("proc", "LOOP_CONFIGURE on /dev/loop[0-9]+ failed: Invalid argument"),
    ],
)
@pytest.mark.parametrize("direct_io", [True, False], ids=["dio", "no-dio"])
def test_failures_leave_nothing_behind(
    tmp_path: Path, kind: str, message: str, direct_io: bool
) -> None:
    make = failing_descriptors(tmp_path)[kind]
    fd = make()
    before = open_fds()
    try:
        with pytest.raises(OSError, match=message):
            attach_read_only(fd, direct_io=direct_io)
        assert open_fds() == before
    finally:
        if kind != "closed":
            os.close(fd)
        leftovers = rows_backed_under(tmp_path)
        detach_leftovers(tmp_path)
    assert leftovers == []
    assert not [row for row in losetup_rows() if row.get("back-file") == "/proc/self/status"]


def test_negative_ranges_are_refused(tmp_path: Path, squashfs_image: Path) -> None:
    fd = os.open(squashfs_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ValueError, match="negative"):
            attach_read_only(fd, offset=-512)
    finally:
        os.close(fd)


def test_many_cycles_leave_no_loop_behind(tmp_path: Path, squashfs_image: Path) -> None:
    before = open_fds()
    fd = os.open(squashfs_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(25):
            device, loop_fd = attach_read_only(fd)
            assert read_device(device.devnode)[:4] == b"hsqs"
            os.close(loop_fd)
            wait_released(device)
    finally:
        os.close(fd)
        leftovers = rows_backed_under(tmp_path)
        detach_leftovers(tmp_path)
    assert open_fds() == before
    assert leftovers == []


def test_concurrent_attaches_get_devices_of_their_own(tmp_path: Path, loops: Attached) -> None:
    images = []
    for index in range(6):
        image = tmp_path / f"image-{index}.img"
        image.write_bytes(bytes([index]) * (64 << 10))
        images.append(image)
    barrier = threading.Barrier(len(images))
    results: dict[int, tuple[LoopDevice, int]] = {}
    errors: list[BaseException] = []

    def attach(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            fd = os.open(images[index], os.O_RDONLY | os.O_CLOEXEC)
            try:
                results[index] = attach_read_only(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for device, loop_fd in results.values():
        loops.adopt(device, loop_fd)
    assert not errors
    assert len({device.devnode for device, _ in results.values()}) == len(images)
    for index, (device, _) in results.items():
        assert read_device(device.devnode) == images[index].read_bytes()


# -- imageformat.detect_layout ---------------------------------------------------------------


def layout_of(path: Path, architecture: str = "x86-64") -> ImageLayout:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return detect_layout(fd, architecture, path.name)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "ext4"])
def test_filesystem_images(tmp_path: Path, fmt: str) -> None:
    image = build_image(tmp_path, "web", FILES, fmt)
    assert layout_of(image) == ImageLayout(fs_type=fmt, offset=0, size=0, tree="root")


@pytest.mark.parametrize("mkfs", ["mkfs.ext2", "mkfs.ext3"])
def test_older_ext_generations_are_ext4(tmp_path: Path, mkfs: str) -> None:
    image = tmp_path / "old.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    run(mkfs, "-q", image)
    assert layout_of(image).fs_type == "ext4"


@pytest.mark.parametrize("architecture", ["x86-64", "arm64", "riscv64"])
@pytest.mark.parametrize("kind", ["root", "usr"])
def test_disk_images(tmp_path: Path, kind: str, architecture: str) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(
        tree, tmp_path / "web.raw", kind=kind, architecture=architecture, label="web_1.2"
    )
    offset, size = partition_offsets(disk)[1]
    assert layout_of(disk, architecture) == ImageLayout(
        fs_type="squashfs", offset=offset, size=size, tree=kind, partition_label="web_1.2"
    )


def test_a_disk_image_for_another_architecture(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw", architecture="arm64")
    with pytest.raises(ImageFormatError) as caught:
        layout_of(disk, "x86-64")
    assert str(caught.value) == (
        "web.raw is a GPT disk image without a root or usr partition for x86-64"
    )


def test_an_unknown_format(tmp_path: Path) -> None:
    image = tmp_path / "junk.raw"
    image.write_bytes(FILLER_PATTERN * 1000)
    with pytest.raises(ImageFormatError) as caught:
        layout_of(image)
    assert str(caught.value) == (
        "junk.raw: unknown image format (neither squashfs, erofs, ext4 nor a GPT disk image)"
    )
    empty = tmp_path / "empty.raw"
    empty.touch()
    with pytest.raises(ImageFormatError, match="unknown image format"):
        layout_of(empty)


def test_a_damaged_gpt(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw")
    with open(disk, "r+b") as f:
        f.seek(512 + 40)
        f.write(b"\x99")
    with pytest.raises(ImageFormatError, match=r"web\.raw is a GPT disk image with a damaged"):
        layout_of(disk)


def test_a_partition_past_the_end_of_the_file(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw")
    offset, size = partition_offsets(disk)[1]
    os.truncate(disk, offset + size - 4096)
    with pytest.raises(
        ImageFormatError, match=re.escape("'root-x86-64' of web.raw reaches past the end")
    ):
        layout_of(disk)


def test_a_partition_without_a_filesystem(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw")
    offset, size = partition_offsets(disk)[1]
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))
    with pytest.raises(ImageFormatError) as caught:
        layout_of(disk)
    assert str(caught.value) == (
        "the root partition 'root-x86-64' of web.raw holds no squashfs, erofs or ext4 filesystem"
    )


def test_not_a_regular_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageFormatError, match=r"web\.raw is not a regular file"):
            detect_layout(fd, "x86-64", "web.raw")
    finally:
        os.close(fd)


def test_a_filesystem_image_is_not_taken_for_a_disk_image(tmp_path: Path) -> None:
    """An ext4 image of a tree that holds a GPT disk image file is still the ext4 image."""
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    inner = build_disk_image(tree, tmp_path / "inner.raw")
    outer_tree = tmp_path / "outer"
    outer_tree.mkdir()
    (outer_tree / "inner.raw").write_bytes(inner.read_bytes())
    outer = tmp_path / "outer.ext4"
    pack_image(outer_tree, outer, "ext4")
    assert stat.S_ISREG(outer.stat().st_mode)
    assert layout_of(outer).fs_type == "ext4"


def test_ddi_refuses_a_usr_tree_with_more_than_usr(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, {**FILES, "etc/web.conf": "x"})
    with pytest.raises(AssertionError, match="only usr/"):
        build_disk_image(tree, tmp_path / "web.raw", kind="usr")


def test_ddi_filler_partition_comes_first(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    disk = build_disk_image(tree, tmp_path / "web.raw")
    (filler_offset, _), (tree_offset, _) = partition_offsets(disk)
    data = disk.read_bytes()
    assert data[filler_offset : filler_offset + len(FILLER_PATTERN)] == FILLER_PATTERN
    assert data[tree_offset : tree_offset + 4] == b"hsqs"
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                      check=True).stdout)  # fmt: skip
    names = [p.get("name") for p in table["partitiontable"]["partitions"]]
    assert names == ["unrelated-data", "root-x86-64"]


def test_a_free_device_held_exclusively_is_retried_then_reported(
    tmp_path: Path, squashfs_image: Path
) -> None:
    """LOOP_CONFIGURE fails with EBUSY on a free device someone holds with O_EXCL, as when
    another process configured it first; LOOP_CTL_GET_FREE keeps naming that device, so the
    bounded retries end in one clear error, with nothing left open or configured."""
    fd = os.open(squashfs_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(20):
            number = free_loop_number()
            holder = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            try:
                if loop_status(f"/dev/loop{number}") is not None or free_loop_number() != number:
                    continue  # another process took it meanwhile: try again
                before = open_fds()
                with pytest.raises(OSError, match="held open exclusively") as caught:
                    attach_read_only(fd)
                assert caught.value.errno == errno.EBUSY
                assert open_fds() == before
                break
            finally:
                os.close(holder)
        else:
            pytest.fail("every free loop device was taken before it could be held")
    finally:
        os.close(fd)
        leftovers = rows_backed_under(tmp_path)
        detach_leftovers(tmp_path)
    assert leftovers == []


@pytest.fixture
def on_4k_sectors(tmp_path: Path) -> Iterator[Path]:
    """A directory on an ext4 filesystem whose disk has 4096-byte logical sectors (a writable
    loop device of this test, set up by losetup and detached after, by its backing file)."""
    backing = tmp_path / "4k-disk.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    disk = run("losetup", "--find", "--show", "--sector-size", "4096", backing).strip()
    target = tmp_path / "4k"
    target.mkdir()
    try:
        # An earlier user of the loop number may have left the kernel's read-only flag set.
        run("blockdev", "--setrw", disk)
        run("mkfs.ext4", "-q", "-b", "4096", disk)
        run("mount", disk, target)
        yield target
    finally:
        unmount_tree(target)
        rows = [row for row in losetup_rows(disk) if row.get("back-file") == str(backing)]
        if rows:
            subprocess.run(["losetup", "-d", disk], capture_output=True, check=False)


def test_direct_io_on_a_disk_with_4096_byte_sectors(
    on_4k_sectors: Path, loops: Attached, squashfs_image: Path, mount_point: Path
) -> None:
    image = on_4k_sectors / "web.squashfs"
    image.write_bytes(squashfs_image.read_bytes())

    device, _ = loops.attach(image)

    (row,) = losetup_rows(device.devnode)
    assert (row["dio"], row["log-sec"]) == (True, 4096)
    assert device.direct_io
    assert read_device(device.devnode) == image.read_bytes()
    run("mount", "-o", "ro", "-t", "squashfs", device.devnode, mount_point)
    assert (mount_point / "usr/bin/web").read_text() == FILES["usr/bin/web"]


@pytest.mark.parametrize(
    ("offset", "direct_io"), [(512, True), (0, False)], ids=["unaligned", "no-dio"]
)
def test_512_byte_sectors_on_a_4096_byte_disk_without_direct_io(
    on_4k_sectors: Path, loops: Attached, offset: int, direct_io: bool
) -> None:
    image = on_4k_sectors / "data.img"
    image.write_bytes(os.urandom(256 << 10))

    device, _ = loops.attach(image, offset=offset, direct_io=direct_io)

    (row,) = losetup_rows(device.devnode)
    assert (row["dio"], row["log-sec"]) == (False, 512)
    assert read_device(device.devnode) == image.read_bytes()[offset:]


def test_a_disk_image_with_4096_byte_sectors(
    tmp_path: Path, loops: Attached, mount_point: Path
) -> None:
    """sfdisk of util-linux 2.38 writes a GPT for 4096-byte sectors only onto a device with
    them: the table is written through a 4096-byte-sector loop device of the test, then the
    filesystem into the file at the partition's offset."""
    tree = tmp_path / "tree"
    write_tree(tree, FILES)
    fs_image = tmp_path / "usr.erofs"
    pack_image(tree / "usr", fs_image, "erofs")
    disk = tmp_path / "web.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    writer = run("losetup", "--find", "--show", "--sector-size", "4096", disk).strip()
    try:
        run("blockdev", "--setrw", writer)
        script = (
            "label: gpt\n"
            "start=256, size=256, type=0fc63daf-8483-4772-8e79-3d69d8477de4\n"
            'start=512, size=2048, type=8484680c-9521-48c6-9c11-b0720656f69e, name="usr-4k"\n'
        )
        subprocess.run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", writer],
            input=script, text=True, capture_output=True, check=True,
        )  # fmt: skip
    finally:
        if any(row.get("back-file") == str(disk) for row in losetup_rows(writer)):
            subprocess.run(["losetup", "-d", writer], capture_output=True, check=False)
    with open(disk, "r+b") as f:
        f.seek(512 * 4096)
        f.write(fs_image.read_bytes())

    layout = layout_of(disk)

    assert layout == ImageLayout(
        fs_type="erofs", offset=512 * 4096, size=2048 * 4096, tree="usr", partition_label="usr-4k"
    )
    device, _ = loops.attach(disk, offset=layout.offset, size=layout.size)
    run("mount", "-o", "ro", "-t", "erofs", device.devnode, mount_point)
    assert (mount_point / "bin/web").read_text() == FILES["usr/bin/web"]


def test_no_direct_io_when_4096_byte_blocks_would_cut_the_tail(
    on_4k_sectors: Path, loops: Attached
) -> None:
    image = on_4k_sectors / "odd.img"
    image.write_bytes(os.urandom((64 << 10) + 512))

    device, _ = loops.attach(image)

    (row,) = losetup_rows(device.devnode)
    assert (row["dio"], row["log-sec"]) == (False, 512)
    assert read_device(device.devnode) == image.read_bytes()
