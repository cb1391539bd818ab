"""Orphans moved aside on the writable volume, before the new stack is built.

Which upper paths are orphans is decided in core/orphans.py, from the indexes of the old and
the new live stack, the base's listing and the upper's entries. Each one is renamed, within
the writable volume (or the tmpfs fallback), from `upper/<key>/<path>` to
`orphans/<generation>/<key>/<path>`, where `<generation>` is the one the change makes. The
daemon never deletes anything there.

The move is made before the new overlay is built, so that the new overlay never sees the
orphan: overlayfs does not expect its upper to change under a mounted overlay, and the only
overlay mounted on this upper then is the old one, about to be swapped out. Until the swap,
the move can be undone (renamed back). A move that fails leaves the path in place, in the
upper and in the stacked view, with an `orphan_not_moved` warning: no data is ever lost,
and the change goes on.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters.indexer import BaseNames, path_kind
from personalityd.adapters.rename import rename_beneath
from personalityd.core.names import hierarchy_key
from personalityd.core.orphans import Orphan, UpperKind, find_orphans
from personalityd.core.packed import PackedTree
from personalityd.stack.layout import Layout, Upper

log = structlog.get_logger()

ORPHANS_DIR = "orphans"

VolumeIndex = Mapping[str, PackedTree]  # hierarchy -> compact index


@dataclass(frozen=True)
class Moved:
    """An orphan renamed from `source` (in the upper) to `target` (under orphans/)."""

    orphan: Orphan
    generation: int
    root: str  # the writable volume's (or tmpfs') mount
    upper_dir: str  # the hierarchy's upper directory on it
    source: str
    target: str
    on_volume: str  # `target` relative to the writable volume's root

    def put_back(self) -> None:
        """Undo the move (before the swap). On failure it stays under orphans/, logged."""
        try:
            rel = os.fsdecode(self.orphan.relpath)
            rename_beneath(self.root, self.on_volume, self.upper_dir, rel)
        except OSError as exc:
            log.error(
                "orphan_not_put_back", path=self.orphan.path, kept=self.target, error=str(exc)
            )


def find(
    layout: Layout,
    upper: Upper,
    hierarchies: Sequence[str],
    old: Sequence[tuple[str, VolumeIndex]],
    new: Mapping[str, Sequence[tuple[str, VolumeIndex]]],
    leaving: Collection[str],
) -> list[Orphan]:
    """The orphans of a change (blocking: reads the base and the upper).

    `old` is the live stack before the change, (name, index) top first, `new` per hierarchy
    the personalities that make it after the change, top first; `leaving` the names that
    leave the live stack."""
    if not leaving:
        return []
    found: list[Orphan] = []
    for h in hierarchies:
        upper_dir = upper.upper_dir(h)
        if upper_dir is None or not os.path.isdir(upper_dir):
            continue
        old_layers = [(name, index[h]) for name, index in old if h in index]
        new_layers = [(name, index[h]) for name, index in new.get(h, ()) if h in index]
        base = BaseNames(layout.base_ref(h))
        found += find_orphans(h, old_layers, new_layers, leaving, base, _upper_kind(upper_dir))
    return found


def _upper_kind(upper_dir: str) -> UpperKind:
    top = os.fsencode(upper_dir)

    def kind(relpath: bytes) -> str | None:
        return path_kind(os.path.join(top, relpath))

    return kind


def move_aside(upper: Upper, generation: int, orphans: Sequence[Orphan]) -> list[Moved]:
    """Rename each orphan to `orphans/<generation>/<key>/<path>` on the upper's volume; the
    ones moved, in order. One that cannot be moved stays where it is (warning)."""
    if upper.root is None:
        return []
    moved: list[Moved] = []
    for orphan in orphans:
        upper_dir = upper.upper_dir(orphan.hierarchy)
        assert upper_dir is not None
        rel = os.fsdecode(orphan.relpath)
        on_volume = f"{ORPHANS_DIR}/{generation}/{hierarchy_key(orphan.hierarchy)}/{rel}"
        source = os.path.join(upper_dir, rel)
        target = os.path.join(upper.root, on_volume)
        try:
            _make_parents(upper.root, target)
            rename_beneath(upper_dir, rel, upper.root, on_volume)
        except OSError as exc:
            log.warning("orphan_not_moved", path=orphan.path, kept=source, error=str(exc))
            continue
        moved.append(Moved(orphan, generation, upper.root, upper_dir, source, target, on_volume))
        log.info("orphan_moved", path=orphan.path, name=orphan.name, to=target)
    return moved


def put_back(moved: Sequence[Moved]) -> None:
    """Undo `move_aside` (newest first), and remove the directories it made if now empty."""
    for item in reversed(moved):
        item.put_back()
        top = os.path.join(item.root, ORPHANS_DIR)
        parent = os.path.dirname(item.target)
        while parent.startswith(top + "/"):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def written_again(moved: Sequence[Moved]) -> list[Moved]:
    """The moved orphans whose path the upper holds again (written through the old stack
    between the move and the swap); they are left where they are."""
    return [m for m in moved if os.path.lexists(m.source)]


def _make_parents(root: str, target: str) -> None:
    """The directories on the way to `target` under `root`; `orphans/` itself root-only (so
    nobody else can change anything below it)."""
    top = os.path.join(root, ORPHANS_DIR)
    if not os.path.isdir(top):
        os.mkdir(top, 0o700)
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
