"""Mounts below a hierarchy, carried from one stack to the next.

A mount reachable below a hierarchy (a bind mount on /etc/resolv.conf, a filesystem on
/usr/local) would be hidden by a new overlay, and one made on the stacked view lost with the
old one. Before each swap, a recursive clone of each is attached inside the new overlay at the
same path, while it is still detached, so the swap stays atomic; at the last detach, the
mounts the base does not hold already are put back onto it. A mount whose path a stack
lacks is set aside until a later stack has it again. Part of the engine: the mounts it
changes are the engine's (stack/engine.py).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters import mounts
from personalityd.adapters.mountinfo import (
    MountEntry,
    read_mountinfo,
    same_mount_source,
    submounts_below,
    top_mount_at,
)
from personalityd.stack.layout import Layout

log = structlog.get_logger()

# Why a mount below a hierarchy has no place in a stack: the errors of open_path.
_MISSING = {
    errno.ENOENT: "has no such path",
    errno.ENOTDIR: "has a file on the way",
    errno.ELOOP: "has a symlink on the way",
    errno.EXDEV: "has another mount on the way",
}


@dataclass
class Submount:
    """A mount below a hierarchy, taken along from one stack to the next."""

    rel: str  # its path below the hierarchy
    entry: MountEntry  # as mountinfo showed it when it was taken
    tree: mounts.Detached  # a recursive clone of it


class Submounts:
    def __init__(self, layout: Layout, detached_targets: bool) -> None:
        self.layout = layout
        # Mounts can be attached inside a detached mount (Linux 6.15+); without it, an
        # overlay that has mounts to carry is attached on its staging directory first.
        self.detached_targets = detached_targets
        self.parked: dict[str, dict[str, Submount]] = {}

    def carry(self, h: str, item: mounts.Detached | str) -> mounts.Detached | str:
        """Put clones of the mounts below the hierarchy onto the built overlay `item`, at the
        same paths; returns what to swap in (the overlay on its staging directory when this
        kernel cannot attach mounts inside a detached one)."""
        taken = self._take_submounts(h)
        if not taken:
            return item
        if isinstance(item, mounts.Detached) and not self.detached_targets:
            staging = self.layout.staging(h)
            os.makedirs(staging, exist_ok=True)
            with item:
                mounts.attach(item, staging)
            item = staging
        if isinstance(item, mounts.Detached):
            self._place_submounts(h, item.fd, taken, "the new stack", xdev=False)
        else:
            fd = mounts.open_path(item)
            try:
                self._place_submounts(h, fd, taken, "the new stack", xdev=False)
            finally:
                os.close(fd)
        return item

    def unstack(self, h: str) -> None:
        """Unmount the hierarchy's overlay (the last detach), and keep the mounts that were
        reachable below it: those the base beneath holds already show again by themselves;
        the others (made on the stacked view) are put on the base at the same paths."""
        target = self.layout.hierarchy(h)
        entries = read_mountinfo()
        overlay = top_mount_at(entries, target)
        beneath = submounts_below(entries, overlay.parent_id, target) if overlay else []
        keep: list[Submount] = []
        for sub in self._take_submounts(h):
            if any(
                b.mount_point == sub.entry.mount_point and same_mount_source(b, sub.entry)
                for b in beneath
            ):
                sub.tree.close()
            else:
                keep.append(sub)
        try:
            mounts.unmount(target)
        except OSError:
            for sub in keep:
                sub.tree.close()
            raise
        if keep:
            fd = mounts.open_path(target)
            try:
                self._place_submounts(h, fd, keep, "the base", xdev=True)
            finally:
                os.close(fd)

    def _take_submounts(self, h: str) -> list[Submount]:
        """Recursive clones of the mounts a lookup below the hierarchy reaches now, and the
        ones set aside earlier whose path nothing is mounted on now; by path."""
        target = self.layout.hierarchy(h)
        taken: dict[str, Submount] = {}
        try:
            top = mounts.open_path(target)
        except OSError as exc:
            log.warning("submounts_not_read", hierarchy=h, error=str(exc))
            return []
        try:
            for entry in submounts_below(read_mountinfo(), mounts.mount_id(top), target):
                if self._is_own_path(entry.mount_point):
                    continue
                rel = entry.mount_point[len(target) + 1 :]
                try:
                    fd = mounts.open_path(rel, top, beneath=True)
                    try:
                        taken[rel] = Submount(rel, entry, mounts.clone_mount(fd, entry.mount_point))
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("submount_not_carried", path=entry.mount_point, error=str(exc))
        finally:
            os.close(top)
        for rel, sub in sorted(self.parked.pop(h, {}).items()):
            if any(rel == r or rel.startswith(r + "/") for r in taken):
                sub.tree.close()  # something else is mounted there now
            else:
                taken[rel] = sub
        return [taken[rel] for rel in sorted(taken)]

    def _place_submounts(
        self, h: str, dirfd: int, taken: Sequence[Submount], onto: str, xdev: bool
    ) -> None:
        """Attach each taken mount at its path below `dirfd`, which is `onto` (never through a
        symlink, nor, without `xdev`, into another mount); one whose path is missing or of
        another type there is set aside, with a warning, until a later stack has it."""
        for sub in taken:
            where = sub.entry.mount_point
            try:
                fd = mounts.open_path(sub.rel, dirfd, beneath=True, xdev=xdev)
            except OSError as exc:
                self._park(h, sub, f"{onto} {_MISSING.get(exc.errno or 0, exc.strerror)}")
                continue
            try:
                is_dir = stat.S_ISDIR(os.fstat(sub.tree.fd).st_mode)
                if stat.S_ISDIR(os.fstat(fd).st_mode) != is_dir:
                    kind = "a directory" if is_dir else "a file"
                    self._park(h, sub, f"it is {kind}, but not in {onto}")
                    continue
                mounts.attach_to(sub.tree, fd, where)
                sub.tree.close()
            except OSError as exc:
                self._park(h, sub, str(exc))
            finally:
                os.close(fd)

    def _park(self, h: str, sub: Submount, reason: str) -> None:
        log.warning("submount_set_aside", hierarchy=h, path=sub.entry.mount_point, reason=reason)
        self.parked.setdefault(h, {})[sub.rel] = sub

    def _is_own_path(self, path: str) -> bool:
        return any(
            path == own or path.startswith(own + "/")
            for own in (self.layout.runtime, self.layout.mount_root)
        )
