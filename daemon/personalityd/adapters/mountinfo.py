"""Reading /proc/self/mountinfo."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")

# The source of every overlay the daemon mounts (adapters/mounts.py): how mountinfo tells ours.
OVERLAY_SOURCE = "personalityd"


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    devnum: tuple[int, int]
    root: str  # the path inside the filesystem that is mounted here
    mount_point: str
    fs_type: str
    source: str


def is_our_overlay(entry: MountEntry) -> bool:
    return entry.fs_type == "overlay" and entry.source == OVERLAY_SOURCE


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    devnum=(int(major), int(minor)),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fs_type=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return entries


def read_mountinfo() -> list[MountEntry]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_at(entries: Iterable[MountEntry], mount_point: str) -> list[MountEntry]:
    """The mounts stacked at `mount_point`, bottom first (each child of the one before)."""
    here = [e for e in entries if e.mount_point == mount_point]
    ids = {e.mount_id for e in here}
    bottom = [e for e in here if e.parent_id not in ids]
    ordered: list[MountEntry] = []
    current = bottom[0] if bottom else None
    while current is not None:
        ordered.append(current)
        current = next((e for e in here if e.parent_id == current.mount_id), None)
    return ordered


def top_mount_at(entries: Iterable[MountEntry], mount_point: str) -> MountEntry | None:
    stack = mounts_at(entries, mount_point)
    return stack[-1] if stack else None


def mounted_from_device(entries: Iterable[MountEntry], devnum: tuple[int, int]) -> list[MountEntry]:
    """Mounts of the whole filesystem on this block device."""
    return [e for e in entries if e.devnum == devnum and e.root == "/"]


def submounts_below(entries: Iterable[MountEntry], top_id: int, path: str) -> list[MountEntry]:
    """The mounts that a lookup below `path` reaches first, where mount `top_id` is what
    `path` shows: each child of `top_id` whose mount point is strictly below `path`, unless
    another such child covers one of the directories above it; sorted by mount point. Mounts
    nested in these are not listed: they belong to their parent."""
    prefix = path.rstrip("/") + "/"
    children: dict[str, MountEntry] = {}
    for entry in entries:
        if entry.parent_id == top_id and entry.mount_point.startswith(prefix):
            children.setdefault(entry.mount_point, entry)
    points = sorted(children)
    reached: list[MountEntry] = []
    for point in points:
        if not any(point.startswith(other + "/") for other in points if other != point):
            reached.append(children[point])
    return reached


def same_mount_source(a: MountEntry, b: MountEntry) -> bool:
    """Whether two mounts show the same directory of the same filesystem (a bind of one
    another, or a clone)."""
    return (a.devnum, a.root, a.fs_type, a.source) == (b.devnum, b.root, b.fs_type, b.source)


SYSEXT_SOURCE = "sysext"  # the source systemd-sysext gives its overlay mounts


def sysext_merges(entries: Sequence[MountEntry], hierarchies: Mapping[str, str]) -> list[str]:
    """The hierarchies (keys of `hierarchies`, which maps them to their path) on which
    systemd-sysext has an overlay of merged extensions."""
    return [
        h
        for h, path in hierarchies.items()
        if any(
            e.fs_type == "overlay" and e.source == SYSEXT_SOURCE for e in mounts_at(entries, path)
        )
    ]
