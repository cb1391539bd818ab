"""Linux mount syscalls through ctypes: the new mount API, plus the legacy calls for fallbacks.

Every wrapper raises a real OSError (errno, message, path) on failure. Nothing here decides what
to mount; engine.py does. A detached mount is held as a file descriptor (`Detached`), and is
freed by the kernel when the last descriptor to it closes, so a failed build leaves nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from personalityd.adapters.mountinfo import OVERLAY_SOURCE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscall numbers from 424 on are the same on every architecture.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_FDCWD = -100

FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200

O_PATH = 0o10000000
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_NODIRATIME = 0x80

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# The kernel's limit on an overlay's lower layers (OVL_MAX_STACK).
OVERLAY_MAX_LOWER = 500

# Every overlay is mounted with these. A lower layer's trusted.overlay.redirect and metacopy
# xattrs are volume content, never instructions: `redirect_dir=nofollow` (not `off`, which
# still follows lower redirects when the module has redirect_always_follow=Y, Debian's
# default) and `metacopy=off`. No index and no xino: the upper dir is shared by two
# generations during a swap, and must not be tied to one particular set of lower layers.
OVERLAY_OPTIONS = ("index=off", "redirect_dir=nofollow", "metacopy=off", "xino=off")

# Mount options that are per-mount attributes rather than filesystem parameters.
MOUNT_ATTR_OPTIONS = {
    "ro": MOUNT_ATTR_RDONLY,
    "nosuid": MOUNT_ATTR_NOSUID,
    "nodev": MOUNT_ATTR_NODEV,
    "noexec": MOUNT_ATTR_NOEXEC,
    "noatime": MOUNT_ATTR_NOATIME,
    "nodiratime": MOUNT_ATTR_NODIRATIME,
}


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _syscall(number: int, *args: object) -> int:
    return int(_libc.syscall(number, *args))


def _b(value: str) -> bytes:
    return os.fsencode(value)


@dataclass
class Detached:
    """A mount that is not attached anywhere yet, held by its file descriptor."""

    fd: int
    description: str

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Detached:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_options(options: Iterable[str]) -> tuple[int, list[str]]:
    """Split mount options into MOUNT_ATTR_* flags and filesystem parameters."""
    attrs = 0
    params: list[str] = []
    for option in options:
        if option in MOUNT_ATTR_OPTIONS:
            attrs |= MOUNT_ATTR_OPTIONS[option]
        elif option in ("rw", "suid", "dev", "exec", "atime", "relatime", "defaults"):
            continue
        else:
            params.append(option)
    return attrs, params


class FsContext:
    """A filesystem context from fsopen(); configure it, then `mount()` it detached."""

    def __init__(self, fs_type: str) -> None:
        self.fs_type = fs_type
        self.fd = _check(_syscall(SYS_FSOPEN, _b(fs_type), FSOPEN_CLOEXEC), f"fsopen({fs_type})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FsContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, what: str, key: str) -> OSError:
        err = ctypes.get_errno()
        detail = self._kernel_message()
        text = f"{what} {key}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        return OSError(err, text)

    def _kernel_message(self) -> str:
        """The kernel's own explanation, read from the context fd (e.g. overlay's reasons)."""
        messages = []
        try:
            while True:
                data = os.read(self.fd, 1024)
                if not data:
                    break
                messages.append(data.decode(errors="replace").strip())
        except OSError:
            pass
        return "; ".join(messages)

    def set_flag(self, key: str) -> None:
        if _syscall(SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, _b(key), None, 0) < 0:
            raise self._fail("fsconfig flag", key)

    def set_string(self, key: str, value: str) -> None:
        if _syscall(SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, _b(key), _b(value), 0) < 0:
            raise self._fail("fsconfig", f"{key}={value}")

    def set_option(self, option: str) -> None:
        key, sep, value = option.partition("=")
        if sep:
            self.set_string(key, value)
        else:
            self.set_flag(key)

    def mount(self, attrs: int, description: str) -> Detached:
        if _syscall(SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            raise self._fail("creating", f"{self.fs_type} for {description}")
        fd = _syscall(SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, attrs)
        if fd < 0:
            raise self._fail("fsmount", description)
        return Detached(fd, description)


def mount_block_device(
    device: str, fs_type: str, options: Sequence[str], description: str
) -> Detached:
    """Mount a block device read-only (superblock and mount), detached."""
    attrs, params = split_options(options)
    with FsContext(fs_type) as ctx:
        ctx.set_string("source", device)
        ctx.set_flag("ro")
        for param in params:
            ctx.set_option(param)
        return ctx.mount(attrs | MOUNT_ATTR_RDONLY, description)


def mount_tmpfs(options: Sequence[str], description: str) -> Detached:
    attrs, params = split_options(options)
    with FsContext("tmpfs") as ctx:
        ctx.set_string("source", OVERLAY_SOURCE)
        for param in params:
            ctx.set_option(param)
        return ctx.mount(attrs, description)


def mount_device_rw(device: str, fs_type: str, attrs: int, description: str) -> Detached:
    with FsContext(fs_type) as ctx:
        ctx.set_string("source", device)
        return ctx.mount(attrs, description)


def overlay_options(upper: str | None, work: str | None) -> list[str]:
    options = list(OVERLAY_OPTIONS)
    if upper is not None and work is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
    return options


def mount_overlay(
    lowers: Sequence[str], upper: str | None, work: str | None, description: str
) -> Detached:
    """An overlay built with `lowerdir+` (Linux 6.8+): one fsconfig call per layer, top first."""
    with FsContext("overlay") as ctx:
        ctx.set_string("source", OVERLAY_SOURCE)
        for lower in lowers:
            ctx.set_string("lowerdir+", lower)
        for option in overlay_options(upper, work):
            ctx.set_option(option)
        attrs = MOUNT_ATTR_NODEV | (0 if upper else MOUNT_ATTR_RDONLY)
        return ctx.mount(attrs, description)


def mount_overlay_legacy(
    lowers: Sequence[str], upper: str | None, work: str | None, target: str, links_dir: str
) -> None:
    """An overlay mounted with mount(2) and one option string, for kernels before 6.8.

    The option string is limited to a page, so each layer is named by a short relative symlink
    in `links_dir`, and the mount is made with that directory as the working directory.
    """
    os.makedirs(links_dir, exist_ok=True)
    for entry in os.listdir(links_dir):
        os.unlink(os.path.join(links_dir, entry))
    short = []
    for i, lower in enumerate(lowers):
        link = format(i, "x")
        os.symlink(lower, os.path.join(links_dir, link))
        short.append(link)
    data = ",".join([f"lowerdir={':'.join(short)}", *overlay_options(upper, work)])
    if len(data) >= 4096:
        raise OSError(errno.E2BIG, f"overlay option string too long for mount(2): {len(data)}")
    flags = MS_NODEV | (0 if upper else MS_RDONLY)
    previous = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(links_dir)
        mount(OVERLAY_SOURCE, target, "overlay", flags, data)
    finally:
        os.fchdir(previous)
        os.close(previous)


def mount(source: str | None, target: str, fs_type: str | None, flags: int, data: str) -> None:
    result = _libc.mount(
        _b(source) if source else None,
        _b(target),
        _b(fs_type) if fs_type else None,
        ctypes.c_ulong(flags),
        _b(data) if data else None,
    )
    _check(result, f"mount {fs_type or 'bind'} on {target}", target)


def clone_tree(path: str, recursive: bool = False, read_only: bool = False) -> Detached:
    """A detached bind mount of `path` (open_tree with OPEN_TREE_CLONE), made private; with
    `read_only`, every mount of the clone is read-only before anyone can reach it."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _check(_syscall(SYS_OPEN_TREE, AT_FDCWD, _b(path), flags), "open_tree", path)
    return _private(Detached(fd, f"bind of {path}"), recursive, read_only)


def clone_mount(fd: int, description: str) -> Detached:
    """A detached recursive clone of the mount whose root the O_PATH descriptor `fd` is
    (with everything mounted below it), made private; its mount attributes are kept."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE | AT_EMPTY_PATH
    result = _check(_syscall(SYS_OPEN_TREE, fd, b"", flags), "open_tree", description)
    return _private(Detached(result, f"bind of {description}"), True, False)


def _private(detached: Detached, recursive: bool, read_only: bool) -> Detached:
    try:
        attrs = MOUNT_ATTR_RDONLY if read_only else 0
        set_attributes(detached, attrs, 0, propagation=MS_PRIVATE, recursive=recursive)
    except OSError:
        detached.close()
        raise
    return detached


def open_path(path: str, dirfd: int = AT_FDCWD, *, beneath: bool = False, xdev: bool = True) -> int:
    """An O_PATH descriptor of `path` (openat2), resolved without following any symlink, so
    a symlink anywhere on the way is ELOOP; with `beneath`, `path` (relative) must stay below
    `dirfd`; without `xdev`, crossing a mount point on the way is EXDEV.

    Where openat2 is refused with ENOSYS (a seccomp filter that predates it, as in some
    containers), the same rules are applied one component at a time."""
    global _openat2_missing
    if not _openat2_missing:
        resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        resolve |= (RESOLVE_BENEATH if beneath else 0) | (0 if xdev else RESOLVE_NO_XDEV)
        how = _OpenHow(O_PATH | os.O_CLOEXEC, 0, resolve)
        result = _syscall(SYS_OPENAT2, dirfd, _b(path), ctypes.byref(how), ctypes.sizeof(how))
        if result >= 0 or ctypes.get_errno() != errno.ENOSYS:
            return _check(result, "open", path)
        _openat2_missing = True
    return _open_path_by_components(path, dirfd, beneath=beneath, xdev=xdev)


_openat2_missing = False


def _open_path_by_components(path: str, dirfd: int, *, beneath: bool, xdev: bool) -> int:
    if path.startswith("/"):
        if beneath:
            raise OSError(errno.EXDEV, "an absolute path is not beneath", path)
        fd = os.open("/", O_PATH | os.O_CLOEXEC)
    else:
        fd = os.open(".", O_PATH | os.O_CLOEXEC, dir_fd=None if dirfd == AT_FDCWD else dirfd)
    try:
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == ".." and beneath:
                raise OSError(errno.EXDEV, "the path leaves its directory", path)
            following = os.open(part, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                if stat.S_ISLNK(os.fstat(following).st_mode):
                    raise OSError(errno.ELOOP, "a symlink on the way", path)
                if not xdev and mount_id(following) != mount_id(fd):
                    raise OSError(errno.EXDEV, "a mount point on the way", path)
            except BaseException:
                os.close(following)
                raise
            os.close(fd)
            fd = following
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount_id(fd: int) -> int:
    """The ID of the mount an open descriptor is on (as /proc/self/mountinfo numbers it)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                return int(value)
    raise OSError(errno.ENOTSUP, "no mnt_id in /proc/self/fdinfo: kernel too old")


def set_attributes(
    detached: Detached, attr_set: int, attr_clr: int, propagation: int = 0, recursive: bool = False
) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result = _syscall(
        SYS_MOUNT_SETATTR, detached.fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"mount_setattr on {detached.description}")


def set_attributes_at(path: str, attr_set: int, recursive: bool = False) -> None:
    """mount_setattr on the mount at `path` (not following a final symlink)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_SYMLINK_NOFOLLOW | (AT_RECURSIVE if recursive else 0)
    result = _syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, _b(path), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, "mount_setattr", path)


def attach_to(detached: Detached, target_fd: int, where: str) -> None:
    """Attach a detached mount on the file or directory that the O_PATH descriptor
    `target_fd` is; that may be inside another detached mount (Linux 6.15+)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    result = _syscall(SYS_MOVE_MOUNT, detached.fd, b"", target_fd, b"", flags)
    _check(result, f"move_mount of {detached.description}", where)


def attach(detached: Detached, target: str, beneath: bool = False) -> None:
    """Attach a detached mount at `target`; with `beneath`, under the mount on top there."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    result = _syscall(SYS_MOVE_MOUNT, detached.fd, b"", AT_FDCWD, _b(target), flags)
    _check(result, f"move_mount{' beneath' if beneath else ''} of {detached.description}", target)


def move(source: str, target: str, beneath: bool = False) -> None:
    """Move the mount at path `source` to `target` (beneath the top mount there if asked)."""
    flags = MOVE_MOUNT_BENEATH if beneath else 0
    result = _syscall(SYS_MOVE_MOUNT, AT_FDCWD, _b(source), AT_FDCWD, _b(target), flags)
    _check(result, f"move_mount {source}", target)


def attach_any(item: Detached | str, target: str, beneath: bool = False) -> None:
    """Attach a detached mount, or move a mount found at a staging path, to `target`."""
    if isinstance(item, Detached):
        attach(item, target, beneath)
    else:
        move(item, target, beneath)


def unmount(target: str, lazy: bool = True) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    _check(_libc.umount2(_b(target), flags), "umount", target)


def kernel_supports_lowerdir_plus() -> bool:
    """Probe by configuring (not creating) an overlay context with a `lowerdir+` layer."""
    try:
        with FsContext("overlay") as ctx:
            ctx.set_string("lowerdir+", "/")
            return True
    except OSError:
        return False


def kernel_supports_beneath(scratch_dir: str) -> bool:
    """Probe MOVE_MOUNT_BENEATH with two throwaway tmpfs mounts on `scratch_dir`.

    The probe mounts at `scratch_dir` and removes what it mounted before returning.
    """
    os.makedirs(scratch_dir, exist_ok=True)
    top = mount_tmpfs(["size=4k"], "beneath probe top")
    try:
        attach(top, scratch_dir)
    finally:
        top.close()
    try:
        with mount_tmpfs(["size=4k"], "beneath probe bottom") as bottom:
            try:
                attach(bottom, scratch_dir, beneath=True)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS):
                    return False
                raise
        unmount(scratch_dir)
        return True
    finally:
        unmount(scratch_dir)


def kernel_supports_detached_targets() -> bool:
    """Probe whether a mount can be attached inside a detached mount (Linux 6.15+), with two
    throwaway detached tmpfs mounts that are never visible anywhere."""
    with (
        mount_tmpfs(["size=4k"], "detached probe target") as target,
        mount_tmpfs(["size=4k"], "detached probe mount") as inner,
    ):
        try:
            attach_to(inner, target.fd, "a detached tmpfs")
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                return False
            raise
    return True


def device_busy(devnode: str) -> bool:
    """A block device still used by a (lazily unmounted) filesystem refuses O_EXCL."""
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False
