"""Orphans: what the upper holds under directories that leave the stack with a personality.

A write under a personality's own directory (a `__pycache__` file under its Python package,
a log under its `/etc/nginx`) lands in the upper. When the personality leaves the live stack,
such a directory would stay behind in the stacked view, made of the upper alone (an empty
namespace package where `import numpy` still succeeds). So before the swap, the upper's entry
at each such path is moved aside (stack/orphans.py). This module decides which paths, from
the packed indexes of the volumes, the base's listing and what the upper holds; it does no I/O
itself (the listings come through callables).

A path of one hierarchy is an orphan when, seen through the lower layers only (the upper left
out, overlayfs rules: the topmost entry decides, directories merge down to an opaque one):

- the old stack shows a directory there, and a leaving personality is one of the layers that
  make it;
- the new stack (the personalities that stay or arrive, then the base) shows nothing there:
  neither the base nor any personality of the new stack provides it;
- the upper has an entry there (a directory holding writes, or a file or whiteout put in
  its place), and has plain (not opaque) directories on the way to it, so what it holds
  there was written over the leaving personality's directory.

Only the topmost such path is one: what is below it goes with it. Below a directory that the
new stack still shows (shared with the base or another personality), each subdirectory is
judged again. A file the administrator wrote into a directory that stays is never an orphan,
and nor is anything below an opaque directory of the upper (written after the lower content
there was hidden).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from personalityd.core.model import DIR, FILE, OPAQUE_DIR, WHITEOUT
from personalityd.core.packed import PackedTree

# `base_names(dir)`: the names in a base directory (b"" is the hierarchy), None when the base
# has no directory there. `upper_kind(path)`: the kind (core/model.py) of the upper's entry at
# a relative path, None when it has none.
BaseNames = Callable[[bytes], Collection[bytes] | None]
UpperKind = Callable[[bytes], str | None]

_DIRS = (DIR, OPAQUE_DIR)
_BASE = -1  # the base as a layer of a view


@dataclass(frozen=True)
class Orphan:
    """One path of the upper to move aside."""

    hierarchy: str  # e.g. "/usr"
    relpath: bytes  # below the hierarchy, e.g. b"lib/python3/dist-packages/numpy"
    name: str  # the leaving personality whose directory it was (the topmost one)

    @property
    def path(self) -> str:
        """The path as seen in the stacked system, e.g. `/usr/lib/python3/...`."""
        return self.hierarchy.rstrip("/") + "/" + os.fsdecode(self.relpath)


class _View:
    """Lower layers (top first), optionally with the base at the bottom, as overlayfs merges
    them: which layers make a directory, and what a name in it is."""

    def __init__(self, layers: Sequence[tuple[str, PackedTree]], base: BaseNames | None) -> None:
        self.names = [name for name, _ in layers]
        self.trees = [tree for _, tree in layers]
        self.dir_maps = [tree.dir_map() for tree in self.trees]
        self.base = base
        self._listings: dict[tuple[int, bytes], dict[bytes, str]] = {}
        self._base: dict[bytes, Collection[bytes] | None] = {}

    def top(self) -> list[int]:
        """The layers that make the hierarchy's top directory."""
        return [*range(len(self.trees)), *([_BASE] if self.base is not None else [])]

    def listing(self, k: int, directory: bytes) -> dict[bytes, str]:
        found = self._listings.get((k, directory))
        if found is None:
            i = self.dir_maps[k].get(directory)
            found = {} if i is None else self.trees[k].listing(i)
            self._listings[(k, directory)] = found
        return found

    def base_names(self, directory: bytes) -> Collection[bytes] | None:
        assert self.base is not None
        if directory not in self._base:
            self._base[directory] = self.base(directory)
        return self._base[directory]

    def kind_in(self, k: int, directory: bytes, name: bytes) -> str | None:
        if k != _BASE:
            return self.listing(k, directory).get(name)
        names = self.base_names(directory)
        if names is None or name not in names:
            return None
        return DIR if self.base_names(_join(directory, name)) is not None else FILE

    def child(self, makers: Sequence[int], directory: bytes, name: bytes) -> list[int] | None:
        """What the merged `directory` (made by `makers`, top first) shows at `name`: the
        layers that make it when it is a directory ([] when it is anything else), or None
        when it shows nothing there."""
        found: list[int] = []
        for k in makers:
            kind = self.kind_in(k, directory, name)
            if kind is None:
                continue
            if kind in _DIRS:
                found.append(k)
                if kind == OPAQUE_DIR:
                    break
                continue
            if found or kind == WHITEOUT:
                break  # below a directory: hidden; a whiteout: deleted
            return []  # a file, symlink or device
        return found or None


def find_orphans(
    hierarchy: str,
    old_layers: Sequence[tuple[str, PackedTree]],
    new_layers: Sequence[tuple[str, PackedTree]],
    leaving: Collection[str],
    base_names: BaseNames,
    upper_kind: UpperKind,
) -> list[Orphan]:
    """The orphans of one hierarchy (see the module docstring), sorted by path.

    `old_layers` and `new_layers` are (personality name, tree of this hierarchy) top first,
    the live stack before and after the change, each only with the personalities that
    provide the hierarchy; `leaving` names the personalities that leave the live stack.
    """
    if not any(name in leaving for name, _ in old_layers):
        return []
    old = _View(old_layers, base_names)
    new = _View(new_layers, base_names)
    found: list[Orphan] = []
    stack: list[tuple[bytes, list[int], list[int]]] = [(b"", old.top(), new.top())]
    while stack:
        directory, old_makers, new_makers = stack.pop()
        candidates: set[bytes] = set()
        for k in old_makers:
            if k != _BASE and old.names[k] in leaving:
                listing = old.listing(k, directory)
                candidates.update(n for n, kind in listing.items() if kind in _DIRS)
        for name in sorted(candidates, reverse=True):
            path = _join(directory, name)
            in_upper = upper_kind(path)
            if in_upper is None:
                continue  # nothing written there (asked first: one lstat, no listing)
            old_child = old.child(old_makers, directory, name)
            leavers = [old.names[k] for k in old_child or () if k != _BASE]
            leavers = [n for n in leavers if n in leaving]
            if not old_child or not leavers:
                continue  # not a directory in the old stack, or not one a leaver made
            new_child = new.child(new_makers, directory, name)
            if new_child is None:
                found.append(Orphan(hierarchy, path, leavers[0]))
            elif new_child and in_upper == DIR:
                stack.append((path, old_child, new_child))
    found.sort(key=lambda o: o.relpath)
    return found


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name
