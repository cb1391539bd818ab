"""What a block device holds right now, as a short key that changes when its content changes.

A device's identity (`major:minor:DISKSEQ`) stays the same when the image behind a loop device
is rewritten in place, so it cannot tell whether what was probed and indexed is still what a
mount of the device shows. The content key can:

- for a loop device (or a partition of one): its size, and the backing file's device, inode,
  size and modification and change times, taken from `LOOP_GET_STATUS64` (which inode the
  loop reads, at which offset) and a stat of the file's path (valid only when the path names
  that inode). The loop reads nothing but that file, and any write to it, through the
  filesystem or through another loop device, moves its ctime, which no user can set back. (A
  backing file on a filesystem that lies about its times, such as a FUSE server, can also
  serve other bytes at every read: no key can vouch for such a medium.);
- for any other device: its size, and a SHA-256 of its first 68 KiB, read with `O_DIRECT` so
  the kernel's cache of the device cannot answer for the medium. That covers the superblock of
  every filesystem `volumes.match` can select (btrfs keeps its own at 64 KiB) and so catches a
  device that was reformatted or given another image (a partition or a cloud volume written
  by root). A change of a few blocks past the superblock goes unseen: only root can write such
  a device, and root can do anything to the stack anyway.

A loop device's key costs a few sysfs reads, an ioctl and a stat (about 0.1 ms); another
device's one direct read of 68 KiB more. Every change takes it for each live volume.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
from pathlib import Path

from personalityd.core.model import BlockDevice

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64), then
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), file name (64), crypt
# name (64), key (32), lo_init (2 x u64): 232 bytes.
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")

HEAD_BYTES = 68 * 1024  # a multiple of every logical block size, past btrfs' superblock


def content_key(device: BlockDevice, backing_fd: int | None = None) -> str:
    """The key of what `device` holds now (see the module docstring). Never raises: a device
    that cannot be read gets a key naming the error, which is stable while that lasts.

    `backing_fd`, for a loop device the daemon made, is its backing file held open: the file
    is then judged by that descriptor rather than by its path, which may name another file
    since (an image renamed over its entry does not change what the loop reads)."""
    name = Path(device.devnode).name
    size = f"size={_sectors(name)}"
    loop = _loop_parent(name)
    if loop is not None:
        return f"{size} {_loop_part(loop, backing_fd)}"
    return f"{size} {_digest(device.devnode)}"


def _sectors(name: str) -> int:
    try:
        return int(Path(f"/sys/class/block/{name}/size").read_text())
    except (OSError, ValueError):
        return -1


def _loop_parent(name: str) -> str | None:
    """`loopN` for /dev/loopN or for a partition of it; None for other devices."""
    sys_dir = Path(f"/sys/class/block/{name}")
    if (sys_dir / "loop").is_dir():
        return name
    if (sys_dir / "partition").exists():
        parent = sys_dir.resolve().parent
        if (parent / "loop").is_dir():
            return parent.name
    return None


def _loop_part(loop: str, backing_fd: int | None = None) -> str:
    try:
        fd = os.open(f"/dev/{loop}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        return f"loop=unreadable:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError as exc:
        return f"loop=unset:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    finally:
        os.close(fd)
    lo_device, lo_inode, _, offset, sizelimit = _LOOP_INFO64.unpack(raw)[:5]
    where = f"loop={os.major(lo_device)}:{os.minor(lo_device)}:{lo_inode}@{offset}+{sizelimit}"
    try:
        if backing_fd is not None:
            st = os.fstat(backing_fd)
        else:
            backing = Path(f"/sys/block/{loop}/loop/backing_file").read_text().rstrip("\n")
            st = os.stat(backing)
    except OSError:
        return where + ":path-gone"
    same = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (
        os.major(lo_device),
        os.minor(lo_device),
        lo_inode,
    )
    if not same:
        return where + ":path-elsewhere"
    if backing_fd is not None:
        # Not the change time: replacing the entry (a rename over it) unlinks this file,
        # which moves its ctime without touching its bytes. Only root can write the daemon's
        # image files (adapters/trustedpath.py), and a write moves the modification time.
        return f"{where}:{st.st_size}:{st.st_mtime_ns}"
    return f"{where}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _digest(devnode: str) -> str:
    try:
        fd = _open_direct(devnode)
    except OSError as exc:
        return f"data=unreadable:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    try:
        return "data=" + hashlib.sha256(_read_at(fd, 0, HEAD_BYTES)).hexdigest()[:32]
    except OSError as exc:
        return f"data=error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    finally:
        os.close(fd)


def _open_direct(devnode: str) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(devnode, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(devnode, flags)  # no direct I/O here: the page cache it is


def _read_at(fd: int, offset: int, length: int) -> bytes:
    """Up to `length` bytes at `offset` into a page-aligned buffer (as O_DIRECT needs)."""
    with mmap.mmap(-1, length) as buffer:
        done = os.preadv(fd, [buffer], offset)
        return bytes(buffer[:done])
