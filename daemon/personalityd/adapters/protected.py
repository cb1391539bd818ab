"""The protected-paths rule (core/protected.py) on a mounted volume tree, for the probe.

Only the entries on the way to each protected path are looked at, each with lstat (never
following a symlink, never opening anything): a handful of system calls per volume. The same
rule is applied again at stack time to the index of the very mount that is stacked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from personalityd.core import model
from personalityd.core.protected import KindAt, Provides, protected_violation

# Only trusted.*: the overlays are not mounted with userxattr, so the kernel reads
# user.overlay.* as plain data (as adapters/indexer.py does).
_OPAQUE_XATTRS = ("trusted.overlay.opaque",)
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP})


def protected_in_tree(
    tree: str, protected: Sequence[str], hierarchies: Sequence[str]
) -> str | None:
    """Why the volume mounted at `tree` may not be stacked (a protected path it provides,
    deletes or hides), or None. Raises OSError when an entry cannot be looked at."""
    if not protected:
        return None
    provides, kind_at = tree_lookup(tree)
    return protected_violation(protected, hierarchies, provides, kind_at)


def tree_lookup(tree: str) -> tuple[Provides, KindAt]:
    """`provides` and `kind_at` of core/protected.py answered from a mounted tree."""

    def provides(hierarchy: str) -> bool:
        path = tree
        for component in hierarchy.strip("/").split("/"):
            path = os.path.join(path, component)
            st = _lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return False  # missing, or not a real directory: the volume has no layer here
        return True

    def kind_at(path: str) -> str | None:
        # The rule asks from the hierarchy down, and stops at anything but a directory, so
        # every component before the last one was seen to be a real directory.
        full = os.path.join(tree, path.lstrip("/"))
        st = _lstat(full)
        return None if st is None else _kind(full, st)

    return provides, kind_at


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise


def _kind(path: str, st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return model.OPAQUE_DIR if _opaque(path) else model.DIR
    if stat.S_ISREG(mode):
        return model.FILE
    if stat.S_ISLNK(mode):
        return model.SYMLINK
    if stat.S_ISCHR(mode):
        return model.WHITEOUT if st.st_rdev == 0 else model.CHAR_DEVICE
    if stat.S_ISBLK(mode):
        return model.BLOCK_DEVICE
    if stat.S_ISFIFO(mode):
        return model.FIFO
    return model.SOCKET


def _opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
    return False
