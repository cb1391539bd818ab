"""The face of a stacked hierarchy: its top directory shows the base's mode, owner, group and
SELinux label, whatever the volumes' own `usr/` or `etc/` say (a volume built with umask 077
has them at 0700). With an upper, overlayfs shows the upper's root directory, so that one is
set; without, an empty metadata layer on top carries them (as systemd-sysext does).
"""

from __future__ import annotations

import errno
import os
import stat

import structlog

log = structlog.get_logger()

SELINUX_XATTR = "security.selinux"


def keep_face(base: str, upper: str | None, meta: str, top_layer: str) -> None:
    """Give the stack's top directory the base's mode, owner and group (and SELinux label):
    the upper's root directory, or the metadata layer `meta` when it is the top layer (empty;
    the base's times too)."""
    st, label = os.stat(base), _label(base)
    if upper is not None:
        _set_face(upper, st, label)
    if top_layer == meta:
        os.makedirs(meta, mode=0o700, exist_ok=True)
        if not stat.S_ISDIR(os.lstat(meta).st_mode) or os.listdir(meta):
            raise OSError(errno.ENOTEMPTY, "the metadata layer is not an empty directory", meta)
        _set_face(meta, st, label)
        os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _label(path: str) -> bytes | None:
    try:
        return os.getxattr(path, SELINUX_XATTR, follow_symlinks=False)
    except OSError:
        return None


def face_of(path: str) -> tuple[int, int, int, bytes | None] | None:
    """What the top directory of a stack shows of `path`: mode, owner, group, label."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _label(path)


def _set_face(path: str, st: os.stat_result, label: bytes | None) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode), follow_symlinks=False)
    if label is not None:
        try:
            os.setxattr(path, SELINUX_XATTR, label, follow_symlinks=False)
        except OSError as exc:
            log.warning("label_not_copied", path=path, error=str(exc))
