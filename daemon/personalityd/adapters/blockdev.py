"""The kernel's read-only flag of a block device (`BLKROSET`, `BLKROGET`).

A personality volume is made read-only in the kernel before the daemon mounts it, so that no
filesystem code can write to it, whatever the image holds: with the flag set, ext4 skips its
orphan cleanup and refuses a journal replay, xfs and btrfs refuse a log replay, instead of
writing (the mount options of `probe.volume_mount_options` make them mount without replay).

The flag is set on the device node the volume is on: for a partition, the partition alone
(another partition of the same disk may be the writable volume). It stays set after the
daemon is done with the device, also across `losetup -d` and a new `losetup` of the same loop
device; `blockdev --setrw DEV` clears it. The writable volume is never made read-only; a
writable volume that is read-only already is named as such (`check_writable`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

# <linux/fs.h>: _IO(0x12, 93) and _IO(0x12, 94); both take a pointer to an int.
BLKROSET = 0x125D
BLKROGET = 0x125E

_INT = struct.Struct("i")


def _open(devnode: str, exclusive: bool) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_EXCL if exclusive else 0)
    return os.open(devnode, flags)


def _get(fd: int) -> bool:
    value: int = _INT.unpack(fcntl.ioctl(fd, BLKROGET, _INT.pack(0)))[0]
    return value != 0


def _check_device(fd: int, devnode: str, devnum: tuple[int, int] | None) -> None:
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        raise OSError(errno.ENOTBLK, f"{devnode} is not a block device", devnode)
    found = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if devnum is not None and found != devnum:
        raise OSError(
            errno.ENODEV,
            f"{devnode} is now device {found[0]}:{found[1]}, not the {devnum[0]}:{devnum[1]} "
            "udev reported",
            devnode,
        )


def is_read_only(devnode: str) -> bool:
    """The kernel's read-only flag of `devnode` (BLKROGET: the device's own flag or the
    disk's, e.g. a loop device set up with `--read-only`)."""
    fd = _open(devnode, exclusive=False)
    try:
        return _get(fd)
    finally:
        os.close(fd)


def check_writable(devnode: str) -> None:
    """Raise OSError(EROFS) naming the flag when the kernel holds `devnode` read-only (a
    read-write mount would fail with a bare "Permission denied")."""
    if is_read_only(devnode):
        raise OSError(
            errno.EROFS,
            f"{devnode} is read-only in the kernel (blockdev --getro); `blockdev --setrw "
            f"{devnode}` makes it writable (a loop device set up with --read-only stays so)",
            devnode,
        )


def make_read_only(devnode: str, devnum: tuple[int, int] | None = None) -> None:
    """Set the kernel's read-only flag of `devnode` (BLKROSET), before it is mounted.

    The device is opened exclusively while the flag is set, so nobody who could be writing to
    it holds it. A device that is held by someone else (mounted or opened exclusively, e.g. in
    another mount namespace, where this daemon cannot read through the mount) is accepted only
    if it is read-only already: setting the flag under another's read-write use would break
    it. `devnum`, when given, must be the device the node names. Raises OSError whose
    `strerror` says what failed and that the device was not mounted.
    """
    try:
        fd = _open(devnode, exclusive=True)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise _failed(devnode, exc, "cannot open it") from exc
        _accept_if_read_only(devnode, devnum)
        return
    try:
        _check_device(fd, devnode, devnum)
        if not _get(fd):
            fcntl.ioctl(fd, BLKROSET, _INT.pack(1))
            if not _get(fd):
                raise OSError(errno.EIO, "the kernel still reports it writable after BLKROSET")
    except OSError as exc:
        raise _failed(devnode, exc, "BLKROSET") from exc
    finally:
        os.close(fd)


def _accept_if_read_only(devnode: str, devnum: tuple[int, int] | None) -> None:
    """A device someone else holds: fine when it is read-only already (e.g. our own earlier
    mount of it is still draining), else refused."""
    try:
        fd = _open(devnode, exclusive=False)
        try:
            _check_device(fd, devnode, devnum)
            if _get(fd):
                return
        finally:
            os.close(fd)
    except OSError as exc:
        raise _failed(devnode, exc, "BLKROGET") from exc
    raise OSError(
        errno.EBUSY,
        f"{devnode} is in use elsewhere (mounted or held open exclusively where this daemon "
        "cannot see it) and is not read-only; it is not mounted, since it may be written",
        devnode,
    )


def _failed(devnode: str, exc: OSError, what: str) -> OSError:
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTBLK, errno.ENODEV):
        text = f"{cause}; it is not mounted"
    else:
        text = f"cannot make {devnode} read-only ({what}: {cause}); it is not mounted"
    return OSError(exc.errno or errno.EIO, text, devnode)
