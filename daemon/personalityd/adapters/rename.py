"""rename(2) that never replaces: `renameat2(..., RENAME_NOREPLACE)` through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_noreplace(source: str, target: str) -> None:
    """Rename `source` to `target` (same filesystem), failing with EEXIST rather than
    replacing whatever `target` is. Raises OSError naming both paths."""
    result = _libc.renameat2(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), source, None, target)
