"""Recognising personality volumes: read the manifest of a block device without exposing it,
and check that nothing in it crosses the trust boundary (docs/security.md).

The device is mounted read-only as a detached mount (no mount point anywhere) and read through
the mount's file descriptor; closing the descriptor unmounts it. A device that is already
mounted elsewhere is read through that existing mount instead (also the daemon's own volume
mount, when a change checks a volume again).

What the check refuses (the volume is listed as `incompatible`, with the first such path):

- a hierarchy (`/usr`, ...) that is a symlink in the volume, at any component: overlayfs
  would resolve it when the layer is built, outside the volume;
- what the caller's `refuse` says of the tree (the protected paths, adapters/protected.py);
- with `nosuid` in the volume options, a regular file with the set-user-ID or set-group-ID
  bit, or with a `security.capability` attribute: overlayfs honours only its own mount's
  `nosuid`, so through the stack such a file would run with the privilege it asks for;
- with `nodev`, a device node (a character device 0:0 is an overlay whiteout: allowed).

FIFOs, sockets and symlinks are data: listed, stacked, never opened or followed by the daemon.
No file of the volume is opened unless an lstat showed a regular file, and the opened file is
checked to be that file (`read_regular`).

The check is bound to the content it saw: the device's content key (adapters/medium.py) is
taken before and after, and both must agree; the key goes with the result, so a change can
tell whether what it mounts is still what was checked.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from personalityd.adapters import blockdev, mounts
from personalityd.adapters.indexer import DIR, OPAQUE_DIR, dir_marks, entry_kind
from personalityd.adapters.medium import content_key
from personalityd.adapters.mountinfo import mounted_from_device, read_mountinfo
from personalityd.core.errors import PersonalityError
from personalityd.core.manifest import (
    EXTENSION_RELEASE_DIRS,
    manifest_name_from_filename,
    parse_manifest,
)
from personalityd.core.model import BlockDevice, Manifest
from personalityd.core.packed import PackedTree, PackedTreeBuilder

MAX_MANIFEST_SIZE = 64 * 1024
SUPPORTED_FS_TYPES = ("squashfs", "erofs", "ext4", "ext3", "ext2", "xfs", "btrfs", "vfat")
# Per filesystem, the options that keep a read-only mount from replaying a journal or log
# onto the device (the kernel's read-only flag makes it refuse to mount instead). The others
# cannot write on a read-only mount: squashfs and erofs are read-only by design, ext2 and vfat
# have no journal (the kernel refuses `norecovery` for ext2).
NO_REPLAY_OPTIONS: dict[str, tuple[str, ...]] = {
    "ext4": ("norecovery",),
    "ext3": ("norecovery",),
    "xfs": ("norecovery",),
    "btrfs": ("rescue=nologreplay",),  # the bare `nologreplay` is gone from the new mount API
}
DEFAULT_HIERARCHIES = ("/usr", "/etc")
# A probe whose device changed under it is made again, this many times in all.
PROBE_ATTEMPTS = 3

CAPABILITY_XATTR = "security.capability"
_SETID = stat.S_ISUID | stat.S_ISGID
_NO_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.ENODATA})
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_NOSUID_TAIL = (
    "volumes.mount_options has nosuid, which the stack cannot honour for it (overlayfs "
    "applies only its own mount's nosuid); remove nosuid from volumes.mount_options to allow "
    "such files in volumes"
)
_NODEV_TAIL = (
    "volumes.mount_options has nodev; remove nodev from volumes.mount_options to allow "
    "device nodes in volumes"
)


class NotAPersonality(Exception):
    """The device is not a usable personality volume; the message says why."""


@dataclass(frozen=True)
class ProbeResult:
    manifest: Manifest
    # The device's content key while it was probed (adapters/medium.py).
    content: str = ""
    # Why the trust boundary refuses the volume (naming the first offending path), or None.
    refusal: str | None = None
    # The index of its hierarchies made by the same walk (`scan_and_index`), or None: valid
    # for a mount of the volume only while that mount's content key is `content`.
    index: dict[str, PackedTree] | None = field(default=None, compare=False, repr=False)


def printable(text: bytes | str) -> str:
    """`text` for a message: undecodable bytes and control characters escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in os.fsdecode(text))


def describe_path(rel: bytes | str) -> str:
    """A volume-relative path for a message: `/usr/bin/x`, control characters escaped."""
    return "/" + printable(rel).lstrip("/")


def symlinked_hierarchy(tree: str, hierarchies: Sequence[str]) -> str | None:
    """The refusal for the first hierarchy of the volume at `tree` that is a symlink at any
    component (`usr`, or `usr/local` for the hierarchy /usr/local), or None."""
    for hierarchy in hierarchies:
        path = tree
        rel = ""
        for component in hierarchy.strip("/").split("/"):
            if not component:
                continue
            rel = f"{rel}/{component}"
            path = os.path.join(path, component)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                return (
                    f"its {describe_path(rel)} is a symlink (to {printable(target)!r}); "
                    "a stacked hierarchy must be a real directory of the volume, or the layer "
                    "would be whatever the link points to"
                )
            if not stat.S_ISDIR(st.st_mode):
                break  # not a directory: the volume does not provide this hierarchy
    return None


def scan_tree(tree: str, *, nosuid: bool, nodev: bool, xattrs: bool = True) -> str | None:
    """One walk of the volume at `tree` (never following symlinks): the refusal for the first
    file that `nosuid` (set-id bit, file capabilities) or `nodev` (a device node that is not
    a whiteout) forbids, or None.

    Directories, symlinks, FIFOs and sockets cost nothing beyond the directory listing
    (`d_type`); each regular file costs one lstat and, unless `xattrs` is False (the
    filesystem provably holds no extended attributes), one listxattr; both only under nosuid.
    Raises NotAPersonality naming the path when a directory cannot be read."""
    if not (nosuid or nodev):
        return None
    top = os.fsencode(tree)
    prefix = len(top)
    lstat, listxattr = os.lstat, os.listxattr
    stack = [top]
    pop, push = stack.pop, stack.append
    while stack:
        directory = pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        if not nosuid:
                            continue
                        path = entry.path
                        mode = lstat(path).st_mode
                        if mode & _SETID:
                            return _setid_refusal(path[prefix:], mode)
                        if xattrs:
                            try:
                                names = listxattr(path, follow_symlinks=False)
                            except OSError as exc:
                                if exc.errno not in _NO_XATTR_ERRNOS:
                                    raise
                                xattrs = False  # the filesystem has no xattrs at all
                                continue
                            if CAPABILITY_XATTR in names:
                                return (
                                    f"it holds a file with file capabilities, "
                                    f"{describe_path(path[prefix:])} ({CAPABILITY_XATTR}); "
                                    + _NOSUID_TAIL
                                )
                    elif entry.is_dir(follow_symlinks=False):
                        push(entry.path)
                    elif nodev and not entry.is_symlink():
                        st = entry.stat(follow_symlinks=False)
                        refusal = _device_refusal(entry.path[prefix:], st)
                        if refusal is not None:
                            return refusal
        except OSError as exc:
            where = exc.filename if isinstance(exc.filename, str | bytes) else directory
            rel = os.fsencode(where)[prefix:]
            raise NotAPersonality(
                f"cannot read {describe_path(rel)} in the volume: {exc.strerror}"
            ) from exc
    return None


# A directory of the walk: its path, and when it is inside a hierarchy being indexed, where
# it goes in that index: (builder, path relative to the hierarchy, own kind or None for the
# hierarchy's top, holds xattr whiteouts).
_InIndex = tuple[PackedTreeBuilder, bytes, str | None, bool] | None


class _IndexUnsure(Exception):
    """Something only the index needed could not be read: the walk goes on as a plain scan,
    and the volume is indexed by its own walk at attach (which reports the error then)."""


def scan_and_index(
    tree: str,
    hierarchies: Sequence[str],
    *,
    nosuid: bool,
    nodev: bool,
    xattrs: bool = True,
) -> tuple[str | None, dict[str, PackedTree] | None]:
    """`scan_tree`, and from the same walk the index of each hierarchy the volume provides,
    exactly as adapters/indexer.py `index_volume_packed` makes it: (refusal, index).

    The refusal is scan_tree's, found in the same order (the same first offending path). The
    index is None when there is a refusal, when the walk is not needed for one (neither
    `nosuid` nor `nodev`), when hierarchies nest (`/usr` and `/usr/local`), or when something
    only the index reads fails. With `xattrs` False (the filesystem provably has none,
    `may_hold_xattrs`) no directory is asked for its overlay marks either: it has none.
    Raises NotAPersonality naming the path when a directory cannot be read."""
    if not (nosuid or nodev):
        return None, None
    walk = _ScanAndIndex(tree, hierarchies, nosuid, nodev, xattrs)
    refusal = walk.run()
    if refusal is not None or not walk.indexing:
        return refusal, None
    return None, {h: walk.builders[h].build() for h in hierarchies if h in walk.builders}


class _ScanAndIndex:
    """The walk of `scan_and_index`: scan_tree's order and checks, plus the index."""

    def __init__(
        self, tree: str, hierarchies: Sequence[str], nosuid: bool, nodev: bool, xattrs: bool
    ) -> None:
        self.top = os.fsencode(tree)
        self.prefix = len(self.top)
        self.nosuid, self.nodev, self.xattrs = nosuid, nodev, xattrs
        self.tops = {os.fsencode(h.strip("/")): h for h in hierarchies}
        nested = any(a != b and b.startswith(a + b"/") for a in self.tops for b in self.tops)
        self.indexing = bool(self.tops) and not nested and b"" not in self.tops
        self.builders: dict[str, PackedTreeBuilder] = {}
        self.stack: list[tuple[bytes, _InIndex]] = [(self.top, None)]

    def run(self) -> str | None:
        stack = self.stack
        while stack:
            directory, place = stack.pop()
            depth = len(stack)
            try:
                refusal = self._directory(directory, place)
            except _IndexUnsure:
                self.indexing = False
                del stack[depth:]  # this directory is scanned again, as a plain scan
                stack.append((directory, None))
                continue
            except OSError as exc:
                where = exc.filename if isinstance(exc.filename, str | bytes) else directory
                rel = os.fsencode(where)[self.prefix :]
                raise NotAPersonality(
                    f"cannot read {describe_path(rel)} in the volume: {exc.strerror}"
                ) from exc
            if refusal is not None:
                return refusal
        return None

    def _directory(self, directory: bytes, place: _InIndex) -> str | None:
        indexed = place is not None and self.indexing
        names: list[bytes] = []
        kinds: list[str] = []
        nosuid, nodev, push = self.nosuid, self.nodev, self.stack.append
        with os.scandir(directory) as entries:
            for entry in entries:
                if indexed:
                    try:
                        kind = entry_kind(entry, place[3])  # type: ignore[index]
                    except OSError as exc:
                        raise _IndexUnsure from exc
                    names.append(entry.name)
                if entry.is_file(follow_symlinks=False):
                    if indexed:
                        kinds.append(kind)
                    if nosuid:
                        refusal = self._file(entry.path)
                        if refusal is not None:
                            return refusal
                elif entry.is_dir(follow_symlinks=False):
                    child = self._child_place(entry, place) if self.indexing else None
                    if indexed:
                        kinds.append(child[2] if child and child[2] else DIR)
                    push((entry.path, child))
                else:
                    if indexed:
                        kinds.append(kind)
                    if nodev and not entry.is_symlink():
                        st = entry.stat(follow_symlinks=False)
                        refusal = _device_refusal(entry.path[self.prefix :], st)
                        if refusal is not None:
                            return refusal
        if place is not None and self.indexing:
            place[0].add_dir(place[1], place[2], names, "".join(kinds))
        return None

    def _file(self, path: bytes) -> str | None:
        """What `nosuid` refuses in the regular file `path`, or None."""
        mode = os.lstat(path).st_mode
        if mode & _SETID:
            return _setid_refusal(path[self.prefix :], mode)
        if not self.xattrs:
            return None
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTR_ERRNOS:
                raise
            self.xattrs = False  # the filesystem has no xattrs at all
            return None
        if CAPABILITY_XATTR in names:
            return (
                f"it holds a file with file capabilities, "
                f"{describe_path(path[self.prefix :])} ({CAPABILITY_XATTR}); " + _NOSUID_TAIL
            )
        return None

    def _child_place(self, entry: os.DirEntry[bytes], place: _InIndex) -> _InIndex:
        """Where the directory `entry` goes in an index: below its parent's, or the top of a
        new one when it is a hierarchy; None outside every hierarchy. Raises _IndexUnsure."""
        if place is None:
            hierarchy = self.tops.get(entry.path[self.prefix + 1 :])
            if hierarchy is None:
                return None
            builder = self.builders[hierarchy] = PackedTreeBuilder()
            return builder, b"", None, self._marks(entry.path)[1]
        builder, rel, _, _ = place
        opaque, xwhiteouts = self._marks(entry.path)
        name = entry.name
        own = OPAQUE_DIR if opaque else DIR
        return builder, rel + b"/" + name if rel else name, own, xwhiteouts

    def _marks(self, path: bytes) -> tuple[bool, bool]:
        if not self.xattrs:
            return False, False
        try:
            return dir_marks(path)
        except OSError as exc:
            raise _IndexUnsure from exc


def _setid_refusal(rel: bytes, mode: int) -> str:
    bits = [
        b
        for flag, b in ((stat.S_ISUID, "set-user-ID"), (stat.S_ISGID, "set-group-ID"))
        if mode & flag
    ]
    return f"it holds a set-id file, {describe_path(rel)} ({', '.join(bits)}); " + _NOSUID_TAIL


def _device_refusal(rel: bytes, st: os.stat_result) -> str | None:
    if stat.S_ISCHR(st.st_mode):
        if st.st_rdev == 0:
            return None  # an overlay whiteout
        kind = "character device"
    elif stat.S_ISBLK(st.st_mode):
        kind = "block device"
    else:
        return None  # FIFO or socket: data
    numbers = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"it holds a device node, {describe_path(rel)} ({kind} {numbers}); " + _NODEV_TAIL


def read_regular(path: str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file `path`, never opening anything else.

    lstat first (a FIFO, a device node or a symlink is never opened), then open with
    O_NOFOLLOW and O_NONBLOCK, and fstat: the open file must be the one the lstat saw.
    Raises NotAPersonality naming the file when it is anything but a small regular file."""
    shown = printable(os.path.basename(path))
    try:
        before = os.lstat(path)
    except OSError as exc:
        raise NotAPersonality(f"cannot read {shown}: {exc.strerror}") from exc
    if not stat.S_ISREG(before.st_mode):
        raise NotAPersonality(f"{shown} is not a regular file (it is {file_kind(before.st_mode)})")
    if before.st_size > limit:
        raise NotAPersonality(f"{shown} is larger than {limit // 1024} KiB")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise NotAPersonality(f"cannot open {shown}: {exc.strerror}") from exc
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) != (
            before.st_dev,
            before.st_ino,
            stat.S_IFMT(before.st_mode),
        ):
            raise NotAPersonality(f"{shown} changed while it was opened")
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise NotAPersonality(f"{shown} is larger than {limit // 1024} KiB")
    return data


def file_kind(mode: int) -> str:
    """`a directory`, `a FIFO`, ... for a message."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "of an unknown kind"


def volume_mount_options(fs_type: str, options: tuple[str, ...]) -> tuple[str, ...]:
    """The configured options, forced read-only, plus what keeps a filesystem with a journal
    or log from replaying it onto the device."""
    forced = [o for o in options if o != "rw"]
    if "ro" not in forced:
        forced.append("ro")
    forced += [o for o in NO_REPLAY_OPTIONS.get(fs_type, ()) if o not in forced]
    return tuple(forced)


def _real_dir(tree: str, rel: str) -> str | None:
    """`tree`/`rel` when every component is a real directory, not a symlink (which would be
    resolved against the daemon's root, outside the volume); else None."""
    path = tree
    for component in rel.split("/"):
        path = os.path.join(path, component)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def read_manifest(tree: str) -> Manifest:
    """Find exactly one extension-release file in a mounted tree and parse it."""
    found: list[tuple[str, str]] = []
    for rel in EXTENSION_RELEASE_DIRS:
        directory = _real_dir(tree, rel)
        if directory is None:
            continue
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for filename in sorted(names):
            name = manifest_name_from_filename(filename)
            if name is not None:
                found.append((name, os.path.join(directory, filename)))
    if not found:
        raise NotAPersonality("no extension-release manifest found")
    if len(found) > 1:
        listed = ", ".join(printable(os.path.basename(path)) for _, path in found)
        raise NotAPersonality(f"more than one manifest ({listed})")
    name, path = found[0]
    text = read_regular(path, MAX_MANIFEST_SIZE).decode("utf-8", errors="replace")
    try:
        return parse_manifest(name, text)
    except PersonalityError as exc:
        raise NotAPersonality(str(exc)) from exc


Refuse = Callable[[str], str | None]  # a mounted tree -> why it may not be stacked, or None

SQUASHFS_MAGIC = b"hsqs"
_SQUASHFS_XATTR_TABLE = struct.Struct("<Q")  # xattr_id_table_start, at byte 56
_SQUASHFS_NO_TABLE = 0xFFFF_FFFF_FFFF_FFFF


def may_hold_xattrs(device: BlockDevice) -> bool:
    """False only when the filesystem on `device` provably has no extended attribute on any
    file: a squashfs whose superblock has no xattr table (the kernel then gives no inode an
    xattr, whatever the inode says). The probe then skips a listxattr per regular file, a
    tenth of its walk. True for everything else, and whenever in doubt."""
    if device.fs_type != "squashfs":
        return True
    try:
        fd = os.open(device.devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            head = os.pread(fd, 64, 0)
        finally:
            os.close(fd)
    except OSError:
        return True
    if len(head) < 64 or head[:4] != SQUASHFS_MAGIC:
        return True
    (table,) = _SQUASHFS_XATTR_TABLE.unpack_from(head, 56)
    return bool(table != _SQUASHFS_NO_TABLE)


def probe_tree(
    tree: str,
    mount_options: Sequence[str],
    hierarchies: Sequence[str] = DEFAULT_HIERARCHIES,
    refuse: Refuse | None = None,
    xattrs: bool = True,
) -> tuple[Manifest, str | None]:
    """The manifest of the volume mounted at `tree`, and why it may not be stacked: a
    symlinked hierarchy, then `refuse(tree)` (the protected paths), then the walk for what
    `nosuid` and `nodev` forbid (`scan_tree`); the first answer wins, None when none."""
    manifest, refusal = _manifest_and_early_refusal(tree, hierarchies, refuse)
    if refusal is None:
        nosuid, nodev = "nosuid" in mount_options, "nodev" in mount_options
        refusal = scan_tree(tree, nosuid=nosuid, nodev=nodev, xattrs=xattrs)
    return manifest, refusal


def probe_tree_indexed(
    tree: str,
    mount_options: Sequence[str],
    hierarchies: Sequence[str] = DEFAULT_HIERARCHIES,
    refuse: Refuse | None = None,
    xattrs: bool = True,
) -> tuple[Manifest, str | None, dict[str, PackedTree] | None]:
    """`probe_tree`, with the walk also indexing the hierarchies (`scan_and_index`): the
    same manifest and refusal, and the index or None."""
    manifest, refusal = _manifest_and_early_refusal(tree, hierarchies, refuse)
    if refusal is not None:
        return manifest, refusal, None
    nosuid, nodev = "nosuid" in mount_options, "nodev" in mount_options
    refusal, index = scan_and_index(tree, hierarchies, nosuid=nosuid, nodev=nodev, xattrs=xattrs)
    return manifest, refusal, index


def _manifest_and_early_refusal(
    tree: str, hierarchies: Sequence[str], refuse: Refuse | None
) -> tuple[Manifest, str | None]:
    manifest = read_manifest(tree)
    refusal = symlinked_hierarchy(tree, hierarchies)
    if refusal is None and refuse is not None:
        refusal = refuse(tree)
    return manifest, refusal


def probe_device(
    device: BlockDevice,
    mount_options: tuple[str, ...],
    hierarchies: Sequence[str] = DEFAULT_HIERARCHIES,
    refuse: Refuse | None = None,
) -> ProbeResult:
    """Read the manifest of `device` and check its content (`probe_tree`). Raises
    NotAPersonality or OSError (mount failed)."""
    fs_type = device.fs_type
    if not fs_type:
        raise NotAPersonality("udev reports no filesystem type (ID_FS_TYPE)")
    if fs_type not in SUPPORTED_FS_TYPES:
        raise NotAPersonality(f"unsupported filesystem type {fs_type!r}")
    for _ in range(PROBE_ATTEMPTS):
        before = content_key(device)
        manifest, refusal = _probe_once(device, mount_options, hierarchies, refuse)
        after = content_key(device)
        if after == before:
            return ProbeResult(manifest, after, refusal)
    raise NotAPersonality(
        f"its content changed while it was checked ({PROBE_ATTEMPTS} times in a row)"
    )


def _probe_once(
    device: BlockDevice,
    mount_options: tuple[str, ...],
    hierarchies: Sequence[str],
    refuse: Refuse | None,
) -> tuple[Manifest, str | None]:
    existing = mounted_from_device(read_mountinfo(), device.devnum)
    if existing:
        return probe_tree(existing[0].mount_point, mount_options, hierarchies, refuse)
    options = (*volume_mount_options(device.fs_type, mount_options), "noexec")
    blockdev.make_read_only(device.devnode, device.devnum)
    # Read before the mount, within the content keys taken around the probe: what the kernel
    # mounts is what was read here (a mount that already exists was read by the kernel at
    # some other time, so there every file is asked).
    xattrs = may_hold_xattrs(device)
    with mounts.mount_block_device(
        device.devnode, device.fs_type, options, f"probe of {device.devnode}"
    ) as detached:
        tree = f"/proc/self/fd/{detached.fd}"
        return probe_tree(tree, mount_options, hierarchies, refuse, xattrs)
