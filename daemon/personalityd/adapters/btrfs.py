"""btrfs subvolumes and snapshots through the kernel's ioctls (no btrfs-progs on the node).

Every name is one path component below a parent directory that is opened with
`O_DIRECTORY|O_NOFOLLOW`, and the ioctl runs on that descriptor, so a symlink put in place of
the parent is refused rather than followed.

Deleting a subvolume (`BTRFS_IOC_SNAP_DESTROY`) needs `CAP_SYS_ADMIN` (or the mount option
`user_subvol_rm_allowed`); the daemon runs as root. A read-only snapshot can then be deleted
as it is; should a kernel refuse that (EPERM, EROFS), its read-only flag is cleared first and
the deletion tried again. The kernel also deletes a subvolume that is still in use (a file
open in it, an overlay that was lazily detached holding it as its upperdir): the name goes at
once, the data once the last user lets go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

BTRFS_SUPER_MAGIC = 0x9123683E
# The root directory of every subvolume has this inode number (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_INODE = 256

# <linux/btrfs.h>: struct btrfs_ioctl_vol_args is { __s64 fd; char name[4088]; } and
# struct btrfs_ioctl_vol_args_v2 is { __s64 fd; __u64 transid; __u64 flags; __u64 unused[4];
# char name[4040]; }, both 4096 bytes.
_VOL_ARGS = struct.Struct("=q4088s")
_VOL_ARGS_V2 = struct.Struct("=qQQ32x4040s")
_U64 = struct.Struct("=Q")


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (0x94 << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (0x94 << 8) | nr


BTRFS_IOC_SUBVOL_CREATE = _iow(14, _VOL_ARGS.size)
BTRFS_IOC_SNAP_DESTROY = _iow(15, _VOL_ARGS.size)
BTRFS_IOC_SNAP_CREATE_V2 = _iow(23, _VOL_ARGS_V2.size)
BTRFS_IOC_SUBVOL_GETFLAGS = _ior(25, _U64.size)
BTRFS_IOC_SUBVOL_SETFLAGS = _iow(26, _U64.size)
BTRFS_SUBVOL_RDONLY = 1 << 1

NAME_MAX = 255

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# struct statfs starts with f_type (a long on the architectures we run on); 120 bytes on
# x86_64 and arm64, the buffer leaves room.
_STATFS_SIZE = 256


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def _check_name(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > NAME_MAX:
        raise OSError(errno.EINVAL, f"{name!r} is not a single path component", name)
    return raw


def _open_dir(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open directory {path}: {exc.strerror}", path) from None


def is_btrfs(path: str) -> bool:
    """Whether `path` (followed if a symlink) is on a btrfs filesystem."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_PATH)
    try:
        return _fs_type(fd) == BTRFS_SUPER_MAGIC
    finally:
        os.close(fd)


def _fd_is_subvolume(fd: int) -> bool:
    st = os.fstat(fd)
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_ino == SUBVOLUME_INODE
        and _fs_type(fd) == BTRFS_SUPER_MAGIC
    )


def is_subvolume(path: str) -> bool:
    """Whether `path` (not followed if a symlink) is the root directory of a btrfs subvolume.
    False when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_PATH)
    except FileNotFoundError:
        return False
    try:
        return _fd_is_subvolume(fd)
    finally:
        os.close(fd)


def _ioctl(fd: int, request: int, arg: bytearray, what: str, path: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot {what} {path}: {exc.strerror}", path) from None


def create_subvolume(parent_dir: str, name: str) -> str:
    """A new empty subvolume `parent_dir/name`; returns its path."""
    raw = _check_name(name)
    path = os.path.join(parent_dir, name)
    fd = _open_dir(parent_dir)
    try:
        arg = bytearray(_VOL_ARGS.pack(0, raw))
        _ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, arg, "create subvolume", path)
    finally:
        os.close(fd)
    return path


def snapshot(source_subvol: str, parent_dir: str, name: str, readonly: bool) -> str:
    """A snapshot of the subvolume `source_subvol` as `parent_dir/name`; returns its path."""
    raw = _check_name(name)
    path = os.path.join(parent_dir, name)
    src = _open_dir(source_subvol)
    try:
        if not _fd_is_subvolume(src):
            raise OSError(errno.EINVAL, f"{source_subvol} is not a btrfs subvolume", source_subvol)
        fd = _open_dir(parent_dir)
        try:
            flags = BTRFS_SUBVOL_RDONLY if readonly else 0
            arg = bytearray(_VOL_ARGS_V2.pack(src, 0, flags, raw))
            _ioctl(fd, BTRFS_IOC_SNAP_CREATE_V2, arg, f"snapshot {source_subvol} as", path)
        finally:
            os.close(fd)
    finally:
        os.close(src)
    return path


def _check_subvolume_at(parent_fd: int, name: str, path: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_PATH, dir_fd=parent_fd)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from None
    try:
        if not _fd_is_subvolume(fd):
            raise OSError(errno.EINVAL, f"{path} is not a btrfs subvolume", path)
    finally:
        os.close(fd)


def is_read_only(path: str) -> bool:
    """The read-only flag of the subvolume `path`."""
    fd = _open_dir(path)
    try:
        arg = bytearray(_U64.size)
        _ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, arg, "read the flags of", path)
        return bool(_U64.unpack(arg)[0] & BTRFS_SUBVOL_RDONLY)
    finally:
        os.close(fd)


def set_read_only(path: str, readonly: bool) -> None:
    """Set or clear the read-only flag of the subvolume `path`."""
    fd = _open_dir(path)
    try:
        arg = bytearray(_U64.size)
        _ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, arg, "read the flags of", path)
        flags = _U64.unpack(arg)[0]
        flags = flags | BTRFS_SUBVOL_RDONLY if readonly else flags & ~BTRFS_SUBVOL_RDONLY
        _ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, bytearray(_U64.pack(flags)), "set flags of", path)
    finally:
        os.close(fd)


def delete_subvolume(parent_dir: str, name: str) -> None:
    """Delete the subvolume `parent_dir/name`, also a read-only one."""
    raw = _check_name(name)
    path = os.path.join(parent_dir, name)
    fd = _open_dir(parent_dir)
    try:
        _check_subvolume_at(fd, name, path)
        arg = bytearray(_VOL_ARGS.pack(0, raw))
        try:
            _ioctl(fd, BTRFS_IOC_SNAP_DESTROY, arg, "delete subvolume", path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EROFS) or not is_read_only(path):
                raise
            set_read_only(path, False)
            _ioctl(fd, BTRFS_IOC_SNAP_DESTROY, arg, "delete subvolume", path)
    finally:
        os.close(fd)
