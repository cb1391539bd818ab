"""Renames the root daemon makes in directories others can write to (the overlay upper).

`renameat2(..., RENAME_NOREPLACE)` through ctypes, between directories reached component by
component with `O_NOFOLLOW`: a directory on the way that someone replaced with a symlink
fails the rename (ELOOP or ENOTDIR) instead of redirecting it, and nothing that is already at
the target is ever replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RENAME_NOREPLACE = 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def rename_beneath(top: str, source: str, target_top: str, target: str) -> None:
    """Rename `top`/`source` to `target_top`/`target` (relative paths, same filesystem),
    following no symlink below `top` and `target_top`, and failing with EEXIST rather than
    replacing what `target` is. Raises OSError naming the source."""
    with (
        _parent(top, source) as (src_fd, src_name),
        _parent(target_top, target) as (
            dst_fd,
            dst_name,
        ),
    ):
        result = _libc.renameat2(src_fd, src_name, dst_fd, dst_name, RENAME_NOREPLACE)
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.path.join(top, source))


@contextlib.contextmanager
def _parent(top: str, rel: str) -> Iterator[tuple[int, bytes]]:
    """An fd of the directory holding `rel` below `top` (no symlink followed on the way),
    and the last component's name."""
    parts = [p for p in os.fsencode(rel).split(b"/") if p]
    if not parts or any(p in (b".", b"..") for p in parts):
        raise OSError(22, "not a relative path below its top", rel)
    fd = os.open(top, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        yield fd, parts[-1]
    finally:
        os.close(fd)
