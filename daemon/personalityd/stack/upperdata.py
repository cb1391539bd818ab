"""The upper's data on a btrfs writable volume: the live subvolume, kept snapshots, restores.

The upper (overlay upperdirs under `upper/`, their workdirs under `work/`) lives in a
subvolume `live/<name>` of the writable volume, and that subvolume is what the stack uses as
its upper root. overlayfs renames from the workdir into the upperdir on copy-up, which btrfs
refuses across subvolumes (EXDEV), so both stay in the one subvolume.

- `keep`: when a generation is left, a read-only snapshot of the live subvolume becomes
  `snapshots/<G>`.
- `restore`: a writable snapshot of `snapshots/<G>` becomes a new live subvolume, which the
  next generation uses; the one it replaces is first kept as `rolled-back/<G>` by
  `keep_rolled_back` (never deleted here).
- `prune`: snapshots of generations no longer in the history, and live subvolumes other than
  the current one, are deleted. An old live subvolume may still be the upperdir of an
  overlay that was lazily detached, with files open: btrfs deletes it all the same (the name
  goes now, the data when the last user lets go). A deletion the kernel refuses is reported
  in the result and tried again by the next prune.

Every method blocks (ioctls, fsync); callers run them in a worker thread. Naming rules are in
core/snapshots.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from personalityd.adapters import btrfs
from personalityd.adapters.state import fsync_dir
from personalityd.core import snapshots as names

log = structlog.get_logger()

LIVE = "live"
SNAPSHOTS = "snapshots"
ROLLED_BACK = "rolled-back"
LEGACY_UPPER = "upper"  # an upper kept at the volume's root, before subvolumes were used


@dataclass
class Pruned:
    """What a prune deleted, and what it could not (path, error), left for the next one."""

    deleted: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


class UpperData:
    """The subvolumes of the upper on one mounted btrfs writable volume."""

    def __init__(self, root: str) -> None:
        self.root = root

    @classmethod
    def open(cls, writable_root: str) -> UpperData | None:
        """The volume mounted at `writable_root`, or None when its data cannot be kept:
        not btrfs, or an upper at its root from before (that data would be left behind)."""
        if not btrfs.is_btrfs(writable_root):
            return None
        if os.path.lexists(os.path.join(writable_root, LEGACY_UPPER)):
            return None
        return cls(writable_root)

    # -- paths ------------------------------------------------------------------------------

    def _dir(self, kind: str) -> str:
        """`root/kind`, made if missing (0700: the snapshots hold what the upper holds, whose
        modes are meant for the paths in the stacked view, not below this directory)."""
        path = os.path.join(self.root, kind)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"{path} is not a directory", path)
        return path

    def _entries(self, kind: str) -> list[str]:
        return os.listdir(self._dir(kind))

    def live_path(self, name: str) -> str:
        return os.path.join(self.root, LIVE, _check_live_name(name))

    def snapshot_path(self, generation: int) -> str:
        return os.path.join(self.root, SNAPSHOTS, names.generation_name(generation))

    # -- the live subvolume -----------------------------------------------------------------

    def live_root(self, name: str | None) -> tuple[str, str]:
        """Make sure live subvolume `name` exists; None: the only (or newest) one there is, or
        a new `0`. Returns (name, the path to use as the upper root)."""
        parent = self._dir(LIVE)
        if name is None:
            found = [n for n in os.listdir(parent) if btrfs.is_subvolume(os.path.join(parent, n))]
            name = names.choose_live(found) or names.suffixed_name(0, 0)
        path = self.live_path(name)
        if not btrfs.is_subvolume(path):
            if os.path.lexists(path):
                raise OSError(errno.EEXIST, f"{path} exists and is not a btrfs subvolume", path)
            btrfs.create_subvolume(parent, name)
            _sync_dir(parent)
            log.info("upper_subvolume_created", path=path)
        return name, path

    def discard(self, name: str) -> None:
        """Delete live subvolume `name` (a restore that was not swapped in)."""
        path = self.live_path(name)
        btrfs.delete_subvolume(os.path.dirname(path), name)

    # -- snapshots --------------------------------------------------------------------------

    def keep(self, generation: int, live_name: str) -> str:
        """A read-only snapshot of live subvolume `live_name` as `snapshots/<generation>`,
        replacing one there is; returns its path. It is made under a temporary name and
        renamed into place, so the name always holds a whole snapshot."""
        source = self.live_path(live_name)
        parent = self._dir(SNAPSHOTS)
        temp = names.temp_name(generation)
        if btrfs.is_subvolume(os.path.join(parent, temp)):
            btrfs.delete_subvolume(parent, temp)
        btrfs.snapshot(source, parent, temp, readonly=True)
        final = self.snapshot_path(generation)
        if btrfs.is_subvolume(final):
            btrfs.delete_subvolume(parent, names.generation_name(generation))
        os.rename(os.path.join(parent, temp), final)
        _sync_dir(parent)
        log.info("upper_snapshot_kept", generation=generation, path=final)
        return final

    def has(self, generation: int) -> bool:
        return btrfs.is_subvolume(self.snapshot_path(generation))

    def generations(self) -> list[int]:
        """The generations that have a kept snapshot, oldest first."""
        parent = self._dir(SNAPSHOTS)
        found = []
        for entry in os.listdir(parent):
            g = names.parse_generation(entry)
            if g is not None and btrfs.is_subvolume(os.path.join(parent, entry)):
                found.append(g)
        return sorted(found)

    def restore(self, generation: int, new_generation: int) -> tuple[str, str]:
        """A writable copy of `snapshots/<generation>` as a new live subvolume for
        `new_generation`; returns (name, path). LookupError when there is no such snapshot."""
        if not self.has(generation):
            raise LookupError(f"no snapshot of the upper of generation {generation}")
        parent = self._dir(LIVE)
        name = names.next_free_name(new_generation, set(os.listdir(parent)))
        path = btrfs.snapshot(self.snapshot_path(generation), parent, name, readonly=False)
        _sync_dir(parent)
        log.info("upper_restored", generation=generation, path=path)
        return name, path

    def keep_rolled_back(self, generation: int, live_name: str) -> str:
        """A read-only snapshot of live subvolume `live_name` as `rolled-back/<generation>`
        (`<generation>.N` if taken); returns its path. Never deleted by the daemon."""
        source = self.live_path(live_name)
        parent = self._dir(ROLLED_BACK)
        name = names.next_free_name(generation, set(os.listdir(parent)))
        path = btrfs.snapshot(source, parent, name, readonly=True)
        _sync_dir(parent)
        log.info("upper_rolled_back_kept", generation=generation, path=path)
        return path

    # -- pruning ----------------------------------------------------------------------------

    def prune(self, keep_generations: Collection[int], live_name: str) -> Pruned:
        """Delete the snapshots of generations not in `keep_generations` and the live
        subvolumes other than `live_name`. What cannot be deleted is logged and returned."""
        _check_live_name(live_name)
        result = Pruned()
        for kind, doomed in (
            (SNAPSHOTS, names.snapshots_to_prune(self._entries(SNAPSHOTS), keep_generations)),
            (LIVE, names.lives_to_prune(self._entries(LIVE), live_name)),
        ):
            parent = os.path.join(self.root, kind)
            for name in doomed:
                path = os.path.join(parent, name)
                if not btrfs.is_subvolume(path):
                    continue  # a name of ours on something we did not make: not ours to delete
                try:
                    btrfs.delete_subvolume(parent, name)
                except OSError as exc:
                    log.warning("upper_prune_failed", path=path, error=str(exc))
                    result.left.append((path, str(exc)))
                else:
                    result.deleted.append(path)
        if result.deleted:
            log.info("upper_pruned", deleted=" ".join(result.deleted))
        return result


def _check_live_name(name: str) -> str:
    if names.parse_suffixed(name) is None:
        raise ValueError(f"{name!r} is not the name of a live subvolume")
    return name


def _sync_dir(path: str) -> None:
    fsync_dir(Path(path))
