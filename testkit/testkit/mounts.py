"""The mount table as /proc/self/mountinfo shows it, and unmounting trees a test owns."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path


def _unescape_mountinfo(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) for each line of /proc/self/mountinfo, in order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = _unescape_mountinfo(left.split()[4])
            fstype, source = right.split()[:2]
            result.append((mount_point, fstype, _unescape_mountinfo(source)))
    return result


def mounts_snapshot() -> set[tuple[str, str, str]]:
    """The set of (mount point, fstype, source) mounted now, for leftover-mount checks."""
    return set(mountinfo())


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, in mount order (parents before children)."""
    prefix = str(path).rstrip("/")
    return [mp for mp, _, _ in mountinfo() if mp == prefix or mp.startswith(prefix + "/")]


def is_mount_point(path: Path | str) -> bool:
    """True when something is mounted exactly at `path`."""
    target = str(path).rstrip("/") or "/"
    return any(mp == target for mp, _, _ in mountinfo())


def unmount_tree(path: Path) -> None:
    """Lazily unmount everything at or below `path`, innermost and newest first.

    Only for trees a test owns (its tmp dir) inside the test's private mount namespace.
    """
    for _ in range(100):
        points = mounts_under(path)
        if not points:
            return
        for mp in reversed(points):
            subprocess.run(["umount", "--lazy", mp], capture_output=True, check=False)
    raise AssertionError(f"mounts left under {path}: {mounts_under(path)}")


def remove_tree(path: Path) -> None:
    """rm -rf a test-owned tree, after lazily unmounting anything still mounted inside it."""
    unmount_tree(path)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
