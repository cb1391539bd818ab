"""The path indexes of mounted volumes, cached by volume identity, and the conflict report.

An index is made once per medium and content (the walk is the expensive part of a change) and
reused by every later change that stacks the same volume with the same content key
(adapters/medium.py): a volume rewritten in place under the same device identity is walked
again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import structlog

from personalityd.adapters.indexer import (
    BaseNames,
    identical_entries,
    index_volume_packed,
    release_free_memory,
)
from personalityd.core.model import Conflict, ConflictReport, Mask, StackPlan, Volume
from personalityd.core.packed import EMPTY, PackedTree, find_conflicts_packed
from personalityd.stack.layout import Layout

log = structlog.get_logger()

VolumeIndex = dict[str, PackedTree]  # hierarchy -> compact index (core/packed.py)


class VolumeIndexes:
    def __init__(self, layout: Layout, hierarchies: Sequence[str]) -> None:
        self.layout = layout
        self.hierarchies = tuple(hierarchies)
        self._by_identity: dict[str, VolumeIndex] = {}
        self._content: dict[str, str] = {}  # identity -> content key the index was made of
        self._from_probe: set[str] = set()  # identities whose index the probe's walk made

    async def index(self, volume: Volume, path: str, content: str) -> VolumeIndex:
        """The index of `volume` mounted at `path`, whose content key is `content` (walked in
        a worker thread unless cached for that content). Raises OSError when the walk fails."""
        identity = volume.device.identity
        cached = self._by_identity.get(identity)
        if cached is not None and self._content.get(identity) == content:
            if identity in self._from_probe:
                self._from_probe.discard(identity)
                entries = sum(map(len, cached.values()))
                log.info("volume_indexed", name=volume.name, entries=entries, by="probe")
            return cached
        self.forget(identity)
        loop = asyncio.get_running_loop()
        index = await loop.run_in_executor(None, index_volume_packed, path, self.hierarchies)
        self._by_identity[identity] = index
        self._content[identity] = content
        release_free_memory()  # the walk's transient lists, so the resident set stays small
        log.info("volume_indexed", name=volume.name, entries=sum(map(len, index.values())))
        return index

    def seed(self, volume: Volume, index: VolumeIndex, content: str) -> None:
        """An index of `volume` made elsewhere (by the probe's walk of the same file), valid
        for a mount whose content key is `content`: `index` uses it for such a mount only,
        and walks any other."""
        identity = volume.device.identity
        self._by_identity[identity] = index
        self._content[identity] = content
        self._from_probe.add(identity)

    def cached(self, volume: Volume) -> VolumeIndex | None:
        """The index of `volume` if it was made (at its mount), else None."""
        return self._by_identity.get(volume.device.identity)

    def forget(self, identity: str) -> None:
        self._by_identity.pop(identity, None)
        self._content.pop(identity, None)
        self._from_probe.discard(identity)

    def provides(self, volumes: Mapping[str, Volume]) -> Callable[[str, str], bool]:
        """`provided(name, hierarchy)` for the planner, from the cached indexes."""

        def provided(name: str, hierarchy: str) -> bool:
            index = self._by_identity.get(volumes[name].device.identity)
            return index is not None and hierarchy in index

        return provided

    def conflict_report(self, plan: StackPlan, volumes: Mapping[str, Volume]) -> ConflictReport:
        """Conflicts, overrides and masks of the planned stack (blocking: a worker thread)."""
        conflicts: list[Conflict] = []
        masks: list[Mask] = []
        overrides = 0
        for h in self.hierarchies:
            names = plan.layers.get(h, ())
            if not names:
                continue
            identity = {n: volumes[n].device.identity for n in names}
            layers = [(n, self._by_identity[identity[n]].get(h, EMPTY)) for n in names]
            base = BaseNames(self.layout.base_ref(h))
            found, count, masked = find_conflicts_packed(h, layers, base, self._identical_in(h))
            conflicts += found
            overrides += count
            masks += masked
        conflicts.sort(key=lambda c: c.path)
        masks.sort(key=lambda m: m.path)
        release_free_memory()
        return ConflictReport(tuple(conflicts), overrides, tuple(masks))

    def _identical_in(self, h: str) -> Callable[[str, Sequence[str]], bool]:
        def identical(relpath: str, names: Sequence[str]) -> bool:
            return identical_entries([f"{self.layout.layer_dir(n, h)}/{relpath}" for n in names])

        return identical
