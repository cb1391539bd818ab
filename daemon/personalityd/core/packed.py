"""A compact tree index, and conflicts found on it without expanding it into paths.

A `PackedTree` holds what a `TreeIndex` (relative path -> kind) holds for one hierarchy of one
volume, grouped by directory: the directory paths once, then each directory's entry names,
NUL-joined in one bytes object, and their kinds one byte each. Names are file system bytes
(NUL is the one byte a name never holds). An entry costs its name's length plus two bytes,
where a dict entry costs over 100 bytes: an index of 300,000 paths stays a few MiB.

Trees must be well formed, as the indexer makes them: every directory that holds entries is
itself an entry (DIR or OPAQUE_DIR) of its parent, except the hierarchy's own top ("").

`find_conflicts_packed` gives exactly what the path-by-path reference rule in the tests gives
for the same trees (checked with hypothesis), but works per directory: only
directories present in two or more layers are looked into name by name, and the base is asked
once per directory (`base_names`), not once per path.

Where the base is reached, the topmost entry that does not merge decides what happens to the
base's entry at that path: a whiteout deletes it and an opaque directory over a base
directory hides its content (both are masks, reported one by one); any other entry of the
top layer there replaces it (an override, only counted).
"""

from __future__ import annotations

import dataclasses
import os
from array import array
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from personalityd.core.model import (
    DIR,
    FILE,
    MASK_DELETED,
    MASK_HIDDEN,
    OPAQUE_DIR,
    SYMLINK,
    WHITEOUT,
    Conflict,
    Mask,
)

_DIR = DIR.encode()[0]
_NOT_AN_ENTRY = ord("-")  # dir_kinds value of the top directory


@dataclass(frozen=True, eq=False)
class PackedTree:
    dirs: tuple[bytes, ...]  # directory paths relative to the hierarchy; b"" is its top
    dir_kinds: bytes  # per directory: its own kind (DIR, OPAQUE_DIR), "-" for the top
    name_offsets: array  # type: ignore[type-arg]  # per directory: start in `names`; +1 end
    kind_offsets: array  # type: ignore[type-arg]  # per directory: start in `kinds`; +1 end
    names: bytes  # each directory's entry names, NUL-joined, directories back to back
    kinds: bytes  # one kind byte per entry, in `names` order

    def __len__(self) -> int:
        return len(self.kinds)

    def dir_map(self) -> dict[bytes, int]:
        return {d: i for i, d in enumerate(self.dirs)}

    def listing(self, i: int) -> dict[bytes, str]:
        """Entry name -> kind of directory number `i`."""
        start, end = self.kind_offsets[i], self.kind_offsets[i + 1]
        if start == end:
            return {}
        names = self.names[self.name_offsets[i] : self.name_offsets[i + 1]].split(b"\0")
        return dict(zip(names, self.kinds[start:end].decode(), strict=True))

    def items(self) -> Iterator[tuple[str, str]]:
        """(relative path, kind) of every entry, as a TreeIndex has them (str paths)."""
        for i, d in enumerate(self.dirs):
            prefix = d + b"/" if d else b""
            for name, kind in self.listing(i).items():
                yield os.fsdecode(prefix + name), kind


class PackedTreeBuilder:
    """Collects a tree directory by directory (`add_dir`), then `build()`s it."""

    def __init__(self) -> None:
        self._dirs: list[bytes] = []
        self._dir_kinds = bytearray()
        self._name_offsets = array("I", [0])
        self._kind_offsets = array("I", [0])
        self._names: list[bytes] = []
        self._kinds: list[str] = []
        self._name_end = 0
        self._kind_end = 0

    def add_dir(self, path: bytes, kind: str | None, names: list[bytes], kinds: str) -> None:
        """Directory `path` (b"" for the top, whose `kind` is None) with its entries."""
        self._dirs.append(path)
        self._dir_kinds.append(_NOT_AN_ENTRY if kind is None else ord(kind))
        if names:
            joined = b"\0".join(names)
            self._names.append(joined)
            self._kinds.append(kinds)
            self._name_end += len(joined)
            self._kind_end += len(kinds)
        self._name_offsets.append(self._name_end)
        self._kind_offsets.append(self._kind_end)

    def build(self) -> PackedTree:
        return PackedTree(
            tuple(self._dirs),
            bytes(self._dir_kinds),
            self._name_offsets,
            self._kind_offsets,
            b"".join(self._names),
            "".join(self._kinds).encode(),
        )


EMPTY = PackedTreeBuilder().build()


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


def find_conflicts_packed(
    hierarchy: str,
    layers: Sequence[tuple[str, PackedTree]],
    base_names: Callable[[bytes], Collection[bytes] | None],
    identical: Callable[[str, Sequence[str]], bool],
) -> tuple[list[Conflict], int, list[Mask]]:
    """The conflicts in one hierarchy (sorted by path), the count of base overrides, and the
    masks: base entries a whiteout deletes or base directories an opaque directory hides
    (sorted by path).

    `layers` are (personality name, tree) top first. `base_names(dir)` gives the names the
    base has in directory `dir` (relative, bytes; b"" is the hierarchy itself), or None when
    the base has no such directory. `identical(relpath, names_top_first)` is asked only for
    conflicts whose entries are all regular files or all symlinks.
    """
    finder = _ConflictFinder(hierarchy, layers, base_names)
    overrides = finder.single_provider_overrides()
    conflicts, questions, more = finder.shared_paths()
    for i, relpath, names_top_first in questions:
        if identical(relpath, names_top_first):
            conflicts[i] = dataclasses.replace(conflicts[i], identical=True)
    conflicts.sort(key=lambda c: c.path)
    finder.masks.sort(key=lambda m: m.path)
    return conflicts, overrides + more, finder.masks


class _ConflictFinder:
    """The state of one `find_conflicts_packed` call: listings and base names read once."""

    def __init__(
        self,
        hierarchy: str,
        layers: Sequence[tuple[str, PackedTree]],
        base_names: Callable[[bytes], Collection[bytes] | None],
    ) -> None:
        self.hierarchy = hierarchy
        self.prefix = hierarchy.rstrip("/") + "/"
        self.masks: list[Mask] = []
        self.n = len(layers)
        self.names = [name for name, _ in layers]
        self.trees = [tree for _, tree in layers]
        self.dir_maps = [tree.dir_map() for tree in self.trees]
        self.base_names = base_names
        self.listings: dict[tuple[int, bytes], dict[bytes, str]] = {}
        self.base_cache: dict[bytes, Collection[bytes] | None] = {}
        # Directory -> the deepest layer index (n: the base too) that reaches its children.
        self.limits: dict[bytes, int] = {b"": self.n}
        self.holders: dict[bytes, list[int]] = {}  # directory -> layers that have it
        for k, dir_map in enumerate(self.dir_maps):
            for d in dir_map:
                self.holders.setdefault(d, []).append(k)
        self.multi = self._provided_twice()

    def _provided_twice(self) -> dict[bytes, list[int]]:
        """Paths that two or more layers provide: only in directories two or more layers have."""
        multi: dict[bytes, list[int]] = {}
        for d, ks in self.holders.items():
            if len(ks) < 2:
                continue
            seen: dict[bytes, list[int]] = {}
            for k in ks:
                for name in self.listing(k, d):
                    seen.setdefault(name, []).append(k)
            for name, providers in seen.items():
                if len(providers) > 1:
                    multi[_join(d, name)] = providers
        return multi

    def listing(self, k: int, directory: bytes) -> dict[bytes, str]:
        found = self.listings.get((k, directory))
        if found is None:
            found = self.trees[k].listing(self.dir_maps[k][directory])
            self.listings[(k, directory)] = found
        return found

    def kind_in(self, k: int, path: bytes) -> str:
        parent, _, name = path.rpartition(b"/")
        return self.listing(k, parent)[name]

    def in_base(self, directory: bytes) -> Collection[bytes] | None:
        if directory not in self.base_cache:
            self.base_cache[directory] = self.base_names(directory)
        return self.base_cache[directory]

    def _cut_at(self, directory: bytes, limit: int) -> int:
        providers = self.multi.get(directory)
        if providers is None:
            ks = self.holders.get(directory)
            if not ks:
                return limit  # in no layer: cuts nothing
            k = ks[0]
            tree = self.trees[k]
            if k > limit or tree.dir_kinds[self.dir_maps[k][directory]] == _DIR:
                return limit
            return k  # an opaque directory
        for k in providers:
            if k > limit:
                break
            kind = self.kind_in(k, directory)
            if kind == DIR:
                continue
            return k if kind == OPAQUE_DIR else k - 1
        return limit

    def limit_below(self, directory: bytes) -> int:
        chain: list[bytes] = []
        limits = self.limits
        while directory not in limits:
            chain.append(directory)
            directory = directory.rpartition(b"/")[0]
        limit = limits[directory]
        for directory in reversed(chain):
            limit = self._cut_at(directory, limit)
            limits[directory] = limit
        return limit

    def single_provider_overrides(self) -> int:
        """Paths with one provider: a replacing entry the base still reaches overrides it,
        a whiteout or an opaque directory there masks it (collected in `masks`)."""
        overrides = 0
        for k, tree in enumerate(self.trees):
            for i, d in enumerate(tree.dirs):
                if tree.kind_offsets[i] == tree.kind_offsets[i + 1]:
                    continue
                if self.limit_below(d) != self.n:
                    continue
                base = self.in_base(d)
                if base:
                    overrides += self._overrides_in(k, d, base)
        return overrides

    def _overrides_in(self, k: int, d: bytes, base: Collection[bytes]) -> int:
        entries = self.listing(k, d)
        count = 0
        for name in entries.keys() & base if isinstance(base, set | frozenset) else entries:
            kind = entries[name]
            if name not in base or kind == DIR:
                continue
            path = _join(d, name)
            if path in self.multi:
                continue
            if not self._masked(k, kind, path):
                count += 1
        return count

    def _masked(self, k: int, kind: str, path: bytes) -> bool:
        """Record a mask when layer `k`'s entry of `kind` at `path` (which the base has, and
        reaches) deletes or hides the base's entry; False when it does neither."""
        if kind == WHITEOUT:
            mask = MASK_DELETED
        elif kind == OPAQUE_DIR and self.in_base(path) is not None:
            mask = MASK_HIDDEN
        else:
            return False
        where = self.prefix + os.fsdecode(path)
        self.masks.append(Mask(where, self.hierarchy, self.names[k], mask))
        return True

    def shared_paths(
        self,
    ) -> tuple[list[Conflict], list[tuple[int, str, tuple[str, ...]]], int]:
        """The conflicts (not yet sorted), the identity questions to ask (conflict index,
        relpath, names top first), and the overrides among paths several layers provide
        (their masks go to `masks`)."""
        hierarchy, prefix = self.hierarchy, self.prefix
        conflicts: list[Conflict] = []
        questions: list[tuple[int, str, tuple[str, ...]]] = []
        overrides = 0
        for path, providers in self.multi.items():
            parent, _, leaf = path.rpartition(b"/")
            limit = self.limit_below(parent)
            reaching = [k for k in providers if k <= limit]
            if not reaching:
                continue
            kinds = [self.kind_in(k, path) for k in reaching]
            if len(reaching) > 1 and any(kind != DIR for kind in kinds):
                relpath = os.fsdecode(path)
                shown = tuple(self.names[k] for k in reaching)
                if all(kind == FILE for kind in kinds) or all(kind == SYMLINK for kind in kinds):
                    questions.append((len(conflicts), relpath, shown))
                conflicts.append(Conflict(prefix + relpath, hierarchy, shown[0], shown[1:], False))
            if limit == self.n:
                overrides += self._base_change(path, parent, leaf, reaching, kinds)
        return conflicts, questions, overrides

    def _base_change(
        self, path: bytes, parent: bytes, leaf: bytes, reaching: list[int], kinds: list[str]
    ) -> int:
        """What the layers reaching `path` (which the base reaches too) do to the base's entry
        there: 1 for an override, 0 for nothing or a mask (recorded)."""
        first = next((j for j, kind in enumerate(kinds) if kind != DIR), None)
        if first is None or (first > 0 and kinds[first] not in (WHITEOUT, OPAQUE_DIR)):
            return 0  # all merge, or a lower personality's entry replaces the base's
        base = self.in_base(parent)
        if not base or leaf not in base:
            return 0
        if self._masked(reaching[first], kinds[first], path):
            return 0
        return 1 if first == 0 else 0
