"""Index a mounted personality volume: every path under each hierarchy, and its kind.

The index feeds the conflict finder (core/conflicts.py), so it follows what overlayfs itself
sees in a lower layer:

- a directory is OPAQUE_DIR when its `trusted.overlay.opaque` xattr is `y`, else DIR (the
  overlays are mounted without `userxattr`, so the kernel reads only the trusted.overlay.*
  namespace; a volume's `user.overlay.*` attributes are plain data to it, and to the index);
- a char device 0:0 is a WHITEOUT;
- a zero-size regular file with the `overlay.whiteout` xattr is a WHITEOUT only inside a
  directory marked for such "xattr whiteouts" (`overlay.opaque` = `x`, or the
  `overlay.whiteouts` xattr of Linux 6.7), exactly as the kernel requires. Elsewhere the kernel
  shows it as an empty file, and so does the index. This also keeps the walk fast: regular
  files are never stat'ed outside such directories; their kind comes from `d_type`.

The walk never follows symlinks and uses an explicit stack, so deep trees cannot hit the
recursion limit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections.abc import Sequence

from personalityd.core import model
from personalityd.core.packed import PackedTree, PackedTreeBuilder

# The nine kind strings, interned once: every value of every index is one of these objects,
# so a 100,000-entry index stores 100,000 pointers, not 100,000 strings.
DIR = sys.intern(model.DIR)
OPAQUE_DIR = sys.intern(model.OPAQUE_DIR)
FILE = sys.intern(model.FILE)
SYMLINK = sys.intern(model.SYMLINK)
WHITEOUT = sys.intern(model.WHITEOUT)
CHAR_DEVICE = sys.intern(model.CHAR_DEVICE)
BLOCK_DEVICE = sys.intern(model.BLOCK_DEVICE)
FIFO = sys.intern(model.FIFO)
SOCKET = sys.intern(model.SOCKET)

_OPAQUE_XATTRS = ("trusted.overlay.opaque",)
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout",)
_WHITEOUTS_MARK_XATTRS = ("trusted.overlay.whiteouts",)
_OVERLAY_XATTRS = frozenset(_OPAQUE_XATTRS + _WHITEOUTS_MARK_XATTRS)

# Errors that mean "this path is not there" rather than "this volume is broken".
_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
# Errors that mean "no xattrs here" (a filesystem without xattr support).
_NO_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.ENODATA})

COMPARE_CHUNK = 1024 * 1024


def _hierarchy_dir(mount_path: str, hierarchy: str) -> str | None:
    """`mount_path` + `hierarchy` if every component is a real directory, else None."""
    path = mount_path
    for component in hierarchy.strip("/").split("/"):
        if not component:
            continue
        path = os.path.join(path, component)
        try:
            st = os.lstat(path)
        except OSError as e:
            if e.errno in _ABSENT_ERRNOS:
                return None
            raise OSError(e.errno, e.strerror, os.fsdecode(path)) from e
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def index_volume_packed(mount_path: str, hierarchies: Sequence[str]) -> dict[str, PackedTree]:
    """Index each hierarchy (`/usr`) the volume mounted at `mount_path` provides, in the
    compact form the daemon keeps (core/packed.py): a few bytes per entry, not a dict's hundred.

    A hierarchy the volume does not have as a real directory (missing, a file, or a symlink
    anywhere on the way) is absent from the result. An unreadable directory or an I/O error
    raises OSError naming the path."""
    result: dict[str, PackedTree] = {}
    for hierarchy in hierarchies:
        top = _hierarchy_dir(mount_path, hierarchy)
        if top is not None:
            result[hierarchy] = index_tree_packed(top)
    return result


def index_tree_packed(top: str) -> PackedTree:
    """Index everything below the directory `top` into a PackedTree.

    Walks with bytes paths (no decoding of names) and one scandir per directory; d_type
    answers for regular files, directories and symlinks."""
    builder = PackedTreeBuilder()
    add_dir = builder.add_dir
    dir_marks = _dir_marks
    other_kind = _other_kind
    is_xattr_whiteout = _is_xattr_whiteout
    top_b = os.fsencode(top)
    # (absolute directory path, relative path, own kind or None for top, holds xattr whiteouts)
    stack: list[tuple[bytes, bytes, str | None, bool]] = [(top_b, b"", None, dir_marks(top_b)[1])]
    pop = stack.pop
    push = stack.append
    while stack:
        dirpath, rel, own_kind, xwhiteouts = pop()
        names: list[bytes] = []
        kinds: list[str] = []
        name_add = names.append
        kind_add = kinds.append
        prefix = rel + b"/" if rel else b""
        try:
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    name = entry.name
                    name_add(name)
                    if entry.is_file(follow_symlinks=False):
                        if xwhiteouts and is_xattr_whiteout(entry):
                            kind_add(WHITEOUT)
                        else:
                            kind_add(FILE)
                    elif entry.is_dir(follow_symlinks=False):
                        opaque, child_xwhiteouts = dir_marks(entry.path)
                        kind = OPAQUE_DIR if opaque else DIR
                        kind_add(kind)
                        push((entry.path, prefix + name, kind, child_xwhiteouts))
                    elif entry.is_symlink():
                        kind_add(SYMLINK)
                    else:
                        kind_add(other_kind(entry.stat(follow_symlinks=False)))
        except OSError as e:
            where = e.filename if isinstance(e.filename, str | bytes) else dirpath
            raise OSError(e.errno, e.strerror, os.fsdecode(where)) from e
        add_dir(rel, own_kind, names, "".join(kinds))
    return builder.build()


class BaseNames:
    """The names in each directory of a base, listed once per directory (for one report).

    `names(b"bin")` is the set of entry names of `<base_dir>/bin`, or None when that is not a
    directory there (missing, or not a directory). Other errors propagate as OSError."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.fsencode(base_dir)

    def __call__(self, relpath: bytes) -> frozenset[bytes] | None:
        path = os.path.join(self.base_dir, relpath) if relpath else self.base_dir
        try:
            return frozenset(os.listdir(path))
        except OSError as e:
            if e.errno in _ABSENT_ERRNOS:
                return None
            raise


def release_free_memory() -> None:
    """Hand memory freed after a large index or report back to the kernel (glibc only)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def dir_marks(path: str | bytes) -> tuple[bool, bool]:
    """(opaque, holds xattr whiteouts) for a directory, from its overlay xattrs."""
    return _dir_marks(path)


def entry_kind(entry: os.DirEntry[bytes], xwhiteouts: bool) -> str:
    """The index kind of one directory entry (`xwhiteouts`: its directory is marked for
    xattr whiteouts); for a directory, DIR (its opaque mark is `dir_marks`)."""
    if entry.is_file(follow_symlinks=False):
        return WHITEOUT if xwhiteouts and _is_xattr_whiteout(entry) else FILE
    if entry.is_dir(follow_symlinks=False):
        return DIR
    if entry.is_symlink():
        return SYMLINK
    return _other_kind(entry.stat(follow_symlinks=False))


def path_kind(path: str | bytes) -> str | None:
    """The index kind of the entry at `path` as overlayfs reads an upper or lower layer
    (OPAQUE_DIR for a directory marked opaque, WHITEOUT for a char device 0:0), or None when
    there is nothing there. Other errors raise OSError."""
    try:
        st = os.lstat(path)
    except OSError as e:
        if e.errno in _ABSENT_ERRNOS:
            return None
        raise
    if stat.S_ISDIR(st.st_mode):
        return OPAQUE_DIR if _dir_marks(path)[0] else DIR
    if stat.S_ISREG(st.st_mode):
        return FILE
    return _other_kind(st)


def _dir_marks(path: str | bytes) -> tuple[bool, bool]:
    """(opaque, holds xattr whiteouts) for a directory, from its overlay xattrs."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_XATTR_ERRNOS:
            return False, False
        raise OSError(e.errno, e.strerror, os.fsdecode(path)) from e
    if not names or _OVERLAY_XATTRS.isdisjoint(names):
        return False, False
    opaque = False
    xwhiteouts = any(name in names for name in _WHITEOUTS_MARK_XATTRS)
    for name in _OPAQUE_XATTRS:
        if name in names:
            value = _getxattr(path, name)
            opaque = opaque or value == b"y"
            xwhiteouts = xwhiteouts or value == b"x"
    return opaque, xwhiteouts


def _getxattr(path: str | bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_XATTR_ERRNOS:
            return None
        raise OSError(e.errno, e.strerror, os.fsdecode(path)) from e


def _is_xattr_whiteout(entry: os.DirEntry[str] | os.DirEntry[bytes]) -> bool:
    if entry.stat(follow_symlinks=False).st_size != 0:
        return False
    return any(_getxattr(entry.path, name) is not None for name in _WHITEOUT_XATTRS)


def _other_kind(st: os.stat_result) -> str:
    """The kind of an entry that is not a directory, regular file or symlink."""
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        return WHITEOUT if st.st_rdev == 0 else CHAR_DEVICE
    if stat.S_ISBLK(mode):
        return BLOCK_DEVICE
    if stat.S_ISFIFO(mode):
        return FIFO
    if stat.S_ISSOCK(mode):
        return SOCKET
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return SYMLINK
    return FILE


def identical_entries(paths: Sequence[str]) -> bool:
    """True when all `paths` are regular files with equal content, or all are symlinks with
    equal targets. Any error while reading, a mix of kinds, or an empty list: False."""
    if not paths:
        return False
    try:
        first = os.lstat(paths[0])
        if stat.S_ISLNK(first.st_mode):
            target = os.readlink(paths[0])
            return all(
                stat.S_ISLNK(os.lstat(p).st_mode) and os.readlink(p) == target for p in paths[1:]
            )
        if stat.S_ISREG(first.st_mode):
            # lstat all first: never open anything but regular files of the same size.
            seen = [first]
            for path in paths[1:]:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size != first.st_size:
                    return False
                seen.append(st)
            return _same_content(paths, seen)
    except OSError:
        return False
    return False


def _same_content(paths: Sequence[str], lstats: Sequence[os.stat_result]) -> bool:
    """Compare regular files, each opened only if it is still the file its lstat (`lstats`)
    saw (never a FIFO or device put in its place): their bytes in COMPARE_CHUNK pieces."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fds: list[int] = []
    try:
        seen: set[tuple[int, int]] = set()
        for path, before in zip(paths, lstats, strict=True):
            fd = os.open(path, flags)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_mode, st.st_size) != (
                before.st_dev,
                before.st_ino,
                before.st_mode,
                before.st_size,
            ):
                os.close(fd)
                return False
            if (st.st_dev, st.st_ino) in seen:  # the same inode twice: nothing to compare
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            fds.append(fd)
        while True:
            reference = _read_full(fds[0], COMPARE_CHUNK)
            if any(_read_full(fd, COMPARE_CHUNK) != reference for fd in fds[1:]):
                return False
            if len(reference) < COMPARE_CHUNK:
                return True
    finally:
        for fd in fds:
            os.close(fd)


def _read_full(fd: int, size: int) -> bytes:
    """Read `size` bytes, fewer only at end of file."""
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    parts = [data]
    remaining = size - len(data)
    while remaining:
        more = os.read(fd, remaining)
        if not more:
            break
        parts.append(more)
        remaining -= len(more)
    return b"".join(parts)
