"""The overlay upper of an install, read into entries, and the image tree made from a plan.

Reading: every entry of the upper with lstat and its overlay marks (`trusted.overlay.opaque`,
a whiteout is a 0:0 character device), `security.capability`, and what the base has at the
same path. Writing: the kept files are hard-linked from the upper into the image tree (the
upper is scratch, and on the same file system), directories are made with their modes,
symlinks copied; no overlay attribute comes along.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from personalityd.core.upperplan import DIR, FILE, OTHER, SYMLINK, WHITEOUT, Entry

OPAQUE_XATTR: Final = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX: Final = "trusted.overlay."


def _kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return DIR
    if stat.S_ISREG(st.st_mode):
        return FILE
    if stat.S_ISLNK(st.st_mode):
        return SYMLINK
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return WHITEOUT
    return OTHER


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def _base_info(base: Path, rel: str) -> tuple[str | None, tuple[int, int, int] | None]:
    try:
        st = os.lstat(base / rel)
    except OSError:
        return None, None
    return _kind(st), (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def read_upper(upper: Path, base: Path) -> Iterator[Entry]:
    """Every entry below `upper` (not the root itself), compared with `base`."""
    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, upper)
            st = os.lstat(full)
            kind = _kind(st)
            in_base, base_meta = _base_info(base, rel)
            yield Entry(
                path=rel,
                kind=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                target=os.readlink(full) if kind == SYMLINK else "",
                opaque=kind == DIR and _xattr(full, OPAQUE_XATTR) == b"y",
                in_base=in_base,
                base_meta=base_meta,
            )


def _make_parents(tree: Path, rel: str) -> Path:
    target = tree / rel
    parent = target.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return target


def _clean_xattrs(path: Path) -> None:
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(OVERLAY_XATTR_PREFIX):
            os.removexattr(path, name, follow_symlinks=False)


def place(upper: Path, tree: Path, items: Iterable[tuple[Entry, str]]) -> None:
    """Put each (entry, image path) into `tree`, in order (parents first)."""
    for entry, dest in items:
        source = upper / entry.path
        target = _make_parents(tree, dest)
        if entry.kind == DIR:
            target.mkdir(exist_ok=True)
            os.chmod(target, entry.mode)
            _clean_xattrs(target)
        elif entry.kind == SYMLINK:
            os.symlink(entry.target, target)
        elif entry.kind == FILE:
            os.link(source, target, follow_symlinks=False)
            _clean_xattrs(target)


def write_file(tree: Path, rel: str, text: str) -> None:
    """A new root-owned 0644 file in the image (parents 0755); never through a symlink."""
    target = tree / rel
    for parent in reversed(target.relative_to(tree).parents[:-1]):
        directory = tree / parent
        if directory.is_symlink():
            raise OSError(errno.ELOOP, "a symlink on the way", str(directory))
        if not directory.exists():
            directory.mkdir()
            directory.chmod(0o755)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(target, 0o644)
