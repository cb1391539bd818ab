"""Read-only loop devices made from an open file descriptor, and the status of loop devices.

The daemon attaches an image file itself (docs/images.md): it opens the file, verifies what
it read through that descriptor, and loops exactly that descriptor with `LOOP_CONFIGURE`, so the
device holds the bytes that were verified even if the path is replaced meanwhile. No `losetup`
runs. The device is set up read-only and with autoclear: the kernel releases it as soon as its
last holder lets go, which is the descriptor `attach_read_only` returns and any mount of it.
A daemon that dies therefore leaves no loop device behind beyond the mounts still using it.

The kernel's read-only flag: `LO_FLAGS_READ_ONLY` makes the loop disk read-only for as long as
it is configured, and the next `LOOP_CONFIGURE` of the same loop number starts afresh. The
daemon must never call `BLKROSET` on its own loop devices (as `blockdev.make_read_only` does to
other volumes): that flag belongs to the block device, not to the configuration, so it would
stay on the loop number after the release and make the next user's device read-only.

Direct I/O (found on Linux 6.18, matching the kernel source since 5.x): `LO_FLAGS_DIRECT_IO` in
`LOOP_CONFIGURE` is enough; the backing file need not be opened with O_DIRECT. The kernel drops
the flag silently (no error) when the backing file cannot do direct I/O or the offset is not
aligned to the backing file's direct I/O alignment, so the result is read back from the device
(`LoopDevice.direct_io`). Direct I/O also needs the loop's logical block size to be at least
that alignment: 6.18 picks it itself when the block size is left 0, older kernels use 512, so
the block size is set explicitly to the alignment (`statx` STATX_DIOALIGN, else the backing
disk's logical block size) when that is larger than 512, and direct I/O is asked for only when
the offset and the length of the range are multiples of it (a loop device holds whole blocks:
a larger block would cut off the image's tail). On a backing store with 4096-byte
sectors the loop then has 4096-byte sectors, which a filesystem with smaller blocks (ext4 with
1 KiB blocks) cannot be mounted from: attach such an image with `direct_io=False`. A kernel
that refuses the flag or the block size (EINVAL) gets the configuration without them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from personalityd.core.model import BlockDevice

# <linux/loop.h>
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16
# <linux/fs.h>: _IOR(0x12, 128, __u64) and _IO(0x12, 104)
BLKGETDISKSEQ = 0x80081280
BLKSSZGET = 0x1268

LOOP_CONTROL = "/dev/loop-control"
LOOP_MAJOR = 7
# How often a free loop device is asked for again when others keep taking the one we got.
MAX_ATTACH_ATTEMPTS = 64

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number,
# lo_encrypt_type, lo_encrypt_key_size, lo_flags, lo_file_name, lo_crypt_name, lo_encrypt_key,
# lo_init[2]; struct loop_config: fd, block_size, info, __reserved[8].
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64x")
_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")

# statx(2), for the direct I/O alignment of the backing file (STATX_DIOALIGN, Linux 6.1).
_STATX_SIZE = 256
_STATX_DIOALIGN = 0x2000
_STATX_MASK = struct.Struct("=I")
_STATX_DIO_OFFSET_ALIGN_AT = 156
_AT_EMPTY_PATH = 0x1000
_SECTOR = 512
_MAX_BLOCK_SIZE = 65536

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class LoopDevice:
    """A loop device this process configured."""

    devnode: str  # "/dev/loop7"
    devnum: tuple[int, int]
    diskseq: int  # the kernel's DISKSEQ: new for every configuration of the loop number
    backing: tuple[int, int]  # (st_dev, st_ino) of the backing file
    offset: int
    size: int  # lo_sizelimit; 0 = to the end of the file
    direct_io: bool

    def block_device(self, fs_type: str) -> BlockDevice:
        """The device as the rest of the daemon sees block devices (as udev would report it)."""
        return BlockDevice(
            devnode=self.devnode,
            devnum=self.devnum,
            properties={
                "ID_FS_TYPE": fs_type,
                "DEVNAME": self.devnode,
                "DISKSEQ": str(self.diskseq),
            },
            diskseq=self.diskseq,
        )


@dataclass(frozen=True)
class LoopStatus:
    """What the kernel reports about a configured loop device (LOOP_GET_STATUS64)."""

    backing: tuple[int, int]  # (st_dev, st_ino) of the backing file
    offset: int
    size: int  # 0 = to the end of the file
    flags: int  # LO_FLAGS_*
    diskseq: int
    backing_file: str  # path text from sysfs, as the kernel saw it at setup; may be ""

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)


def attach_read_only(
    fd: int, *, offset: int = 0, size: int = 0, direct_io: bool = True
) -> tuple[LoopDevice, int]:
    """Configure a free loop device, read-only and autoclear, over the file open as `fd`.

    `offset` and `size` (bytes; 0 = to the end) select a byte range, e.g. a GPT partition.
    With `direct_io`, direct I/O is asked for where the backing file allows it (see the module
    docstring); `LoopDevice.direct_io` says whether the kernel turned it on.

    Returns the device and an O_RDONLY|O_CLOEXEC descriptor of it, which keeps the device
    configured: once it is closed and no mount uses the device, the kernel releases it. If
    another process takes the free device first, another one is tried (a bounded number of
    times). Raises OSError whose message names the cause; nothing is left configured or open.
    """
    if offset < 0 or size < 0:
        raise ValueError(f"offset and size must not be negative (got {offset}, {size})")
    backing = _backing_stat(fd)
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    block_size = 0
    if direct_io:
        dio_block_size = _direct_io_block_size(fd, backing, offset, size)
        if dio_block_size is not None:
            flags |= LO_FLAGS_DIRECT_IO
            block_size = dio_block_size
    for _ in range(MAX_ATTACH_ATTEMPTS):
        devnode, loop_fd = _open_free_loop()
        if loop_fd < 0:
            continue  # the free device went away before we opened it
        try:
            _configure(loop_fd, fd, flags, block_size, offset, size)
        except OSError as exc:
            os.close(loop_fd)
            if exc.errno == errno.EBUSY:
                continue
            if exc.errno == errno.EINVAL and (flags & LO_FLAGS_DIRECT_IO or block_size):
                flags &= ~LO_FLAGS_DIRECT_IO
                block_size = 0
                continue
            raise _configure_failed(fd, devnode, exc) from exc
        try:
            return _describe(loop_fd, devnode), loop_fd
        except BaseException:
            os.close(loop_fd)  # autoclear: the kernel releases the device with this close
            raise
    raise OSError(
        errno.EBUSY,
        f"cannot set up a loop device for {_fd_text(fd)}: in {MAX_ATTACH_ATTEMPTS} attempts, "
        "each free loop device was taken by another process first, or held open exclusively",
    )


def loop_status(devnode: str) -> LoopStatus | None:
    """The configuration of loop device `devnode`; None when it is not configured or gone.

    Raises OSError for a device node that is not a loop device or cannot be opened.
    """
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
            raise OSError(errno.ENOTTY, f"{devnode} is not a loop device", devnode)
        devnum = (os.major(st.st_rdev), os.minor(st.st_rdev))
        # The diskseq is read on both sides of the status, so both belong to one configuration
        # even if the device is released and configured again by someone else in between.
        for _ in range(MAX_ATTACH_ATTEMPTS):
            before = _diskseq(fd, devnum)
            try:
                info = _get_status(fd)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENODEV):
                    return None
                raise OSError(exc.errno, f"{devnode}: LOOP_GET_STATUS64: {exc.strerror}",
                              devnode) from exc  # fmt: skip
            diskseq = _diskseq(fd, devnum)
            if diskseq == before:
                break
        return LoopStatus(
            backing=info.backing,
            offset=info.offset,
            size=info.size,
            flags=info.flags,
            diskseq=diskseq,
            backing_file=_sysfs_text(devnum, "loop/backing_file"),
        )
    finally:
        os.close(fd)


def is_read_only_loop(devnode: str) -> bool:
    """True when `devnode` is a configured loop device set up read-only."""
    status = loop_status(devnode)
    return status is not None and status.read_only


def _backing_stat(fd: int) -> os.stat_result:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot set up a loop device: file descriptor {fd} is not open"
        ) from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(
            errno.EINVAL,
            f"cannot set up a loop device for {_fd_text(fd)}: "
            "it is neither a regular file nor a block device",
        )
    # A volume is never opened for writing (docs/security.md), not even through its loop.
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        raise OSError(
            errno.EPERM,
            f"cannot set up a loop device for {_fd_text(fd)}: it is open for writing; "
            "image files are looped only from read-only descriptors",
        )
    return st


def _open_free_loop() -> tuple[str, int]:
    """(devnode, descriptor) of a loop device that was free a moment ago; descriptor -1 when
    the device was removed before it could be opened."""
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (is the loop module loaded?)" if exc.errno == errno.ENOENT else ""
        raise OSError(exc.errno, f"cannot open {LOOP_CONTROL}: {exc.strerror}{hint}") from exc
    try:
        number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise OSError(
            exc.errno, f"no free loop device (LOOP_CTL_GET_FREE: {exc.strerror})"
        ) from exc
    finally:
        os.close(control)
    devnode = f"/dev/loop{number}"
    try:
        return devnode, os.open(devnode, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return devnode, -1
        raise OSError(exc.errno, f"cannot open {devnode}: {exc.strerror}", devnode) from exc


def _configure(loop_fd: int, fd: int, flags: int, block_size: int, offset: int, size: int) -> None:
    info = _LOOP_INFO64.pack(0, 0, 0, offset, size, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _LOOP_CONFIG.pack(fd, block_size, info))


def _configure_failed(fd: int, devnode: str, exc: OSError) -> OSError:
    return OSError(
        exc.errno,
        f"cannot set up a loop device for {_fd_text(fd)}: LOOP_CONFIGURE on {devnode} failed: "
        f"{exc.strerror}",
    )


def _describe(loop_fd: int, devnode: str) -> LoopDevice:
    st = os.fstat(loop_fd)
    devnum = (os.major(st.st_rdev), os.minor(st.st_rdev))
    info = _get_status(loop_fd)
    return LoopDevice(
        devnode=devnode,
        devnum=devnum,
        diskseq=_diskseq(loop_fd, devnum),
        backing=info.backing,
        offset=info.offset,
        size=info.size,
        direct_io=bool(info.flags & LO_FLAGS_DIRECT_IO),
    )


@dataclass(frozen=True)
class _Status:
    backing: tuple[int, int]
    offset: int
    size: int
    flags: int


def _get_status(loop_fd: int) -> _Status:
    raw = fcntl.ioctl(loop_fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    device, inode, _rdevice, offset, sizelimit, _number, _type, _key_size, flags, *_ = (
        _LOOP_INFO64.unpack(raw)
    )
    return _Status(
        backing=(_decode_dev(int(device)), int(inode)),
        offset=int(offset),
        size=int(sizelimit),
        flags=int(flags),
    )


def _decode_dev(encoded: int) -> int:
    """The kernel's huge_encode_dev() form (as in loop_info64) as a Python st_dev."""
    major = (encoded & 0xFFF00) >> 8
    minor = (encoded & 0xFF) | ((encoded >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _diskseq(fd: int, devnum: tuple[int, int]) -> int:
    try:
        value: int = _U64.unpack(fcntl.ioctl(fd, BLKGETDISKSEQ, bytes(_U64.size)))[0]
        return value
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
    text = _sysfs_text(devnum, "diskseq")
    return int(text) if text.isdigit() else 0


def _sysfs_text(devnum: tuple[int, int], attribute: str) -> str:
    try:
        with open(f"/sys/dev/block/{devnum[0]}:{devnum[1]}/{attribute}") as f:
            return f.read().strip()
    except OSError:
        return ""


def _fd_text(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return f"file descriptor {fd}"


def _direct_io_block_size(fd: int, backing: os.stat_result, offset: int, size: int) -> int | None:
    """The loop block size that lets direct I/O work on the backing file (0 = the kernel's
    default will do); None when direct I/O cannot work for this file and byte range.

    The whole range must be made of blocks of the alignment: a loop device has a whole number
    of its blocks, so a larger block size would cut off the tail of the image."""
    alignment = _direct_io_alignment(fd, backing)
    if alignment is None or alignment & (alignment - 1) or alignment > _MAX_BLOCK_SIZE:
        return None
    length = size
    if not length and stat.S_ISREG(backing.st_mode):
        length = max(backing.st_size - offset, 0)
    if offset % alignment or length % alignment:
        return None
    return alignment if alignment > _SECTOR else 0


def _direct_io_alignment(fd: int, backing: os.stat_result) -> int | None:
    """The backing file's direct I/O offset alignment in bytes; None when it has no direct
    I/O at all."""
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    statx = getattr(_libc, "statx", None)  # glibc 2.28 and later
    if statx is not None and statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buffer) == 0:
        (mask,) = _STATX_MASK.unpack_from(buffer.raw, 0)
        if mask & _STATX_DIOALIGN:
            (alignment,) = _STATX_MASK.unpack_from(buffer.raw, _STATX_DIO_OFFSET_ALIGN_AT)
            return alignment or None
    if stat.S_ISBLK(backing.st_mode):
        with contextlib.suppress(OSError):
            sector: int = _INT.unpack(fcntl.ioctl(fd, BLKSSZGET, _INT.pack(0)))[0]
            return sector
    # A kernel before 6.1: the logical block size of the disk the backing filesystem is on.
    disk = f"/sys/dev/block/{os.major(backing.st_dev)}:{os.minor(backing.st_dev)}"
    for queue in (f"{disk}/queue", f"{disk}/../queue"):
        with contextlib.suppress(OSError, ValueError), open(f"{queue}/logical_block_size") as f:
            return int(f.read())
    return _SECTOR
