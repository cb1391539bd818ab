"""Applies stack plans to the system: the only place that changes mounts.

A change is one transaction. First everything new is prepared where nobody looks: volume
mounts at `<mount_root>/<name>`, their indexes, the conflict report, and each hierarchy's new
overlay as a detached mount. Only then is each hierarchy swapped: the new overlay is moved
beneath the old one (MOVE_MOUNT_BENEATH) and the old top is lazily unmounted, so a path under
the hierarchy resolves to the old stack or to the new one, never to nothing. A failure before
the swap undoes what was prepared and leaves the visible system as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from personalityd.adapters import mounts
from personalityd.adapters.indexer import (
    BaseNames,
    identical_entries,
    index_volume_packed,
    release_free_memory,
)
from personalityd.adapters.mountinfo import (
    MountEntry,
    mounted_from_device,
    mounts_at,
    read_mountinfo,
    top_mount_at,
)
from personalityd.adapters.probe import volume_mount_options
from personalityd.config import Config
from personalityd.core.errors import MountFailed
from personalityd.core.model import BlockDevice, Conflict, ConflictReport, StackPlan, Volume
from personalityd.core.names import hierarchy_key
from personalityd.core.packed import EMPTY, PackedTree, find_conflicts_packed

log = structlog.get_logger()

OVERLAY_SOURCE = "personalityd"
VolumeIndex = dict[str, PackedTree]  # hierarchy -> compact index (core/packed.py)


@dataclass(frozen=True)
class MountFeatures:
    lowerdir_plus: bool  # overlay layers appended one by one (Linux 6.8+)
    beneath: bool  # MOVE_MOUNT_BENEATH (Linux 6.5+)


def detect_features(config: Config, scratch_dir: str) -> MountFeatures:
    """What the kernel offers, narrowed by the `stack.overlay_api` and `stack.swap` settings."""
    lowerdir_plus = config.overlay_api != "legacy" and mounts.kernel_supports_lowerdir_plus()
    if config.overlay_api == "lowerdir+" and not lowerdir_plus:
        raise MountFailed("stack.overlay_api is 'lowerdir+' but this kernel lacks it (6.8+)")
    beneath = config.swap != "replace" and mounts.kernel_supports_beneath(scratch_dir)
    if config.swap == "beneath" and not beneath:
        raise MountFailed("stack.swap is 'beneath' but this kernel lacks MOVE_MOUNT_BENEATH")
    features = MountFeatures(lowerdir_plus, beneath)
    log.info(
        "mount_features",
        overlay_api="lowerdir+" if lowerdir_plus else "legacy option string",
        swap="move beneath, then detach old top" if beneath else "detach old top, then move in",
    )
    if not lowerdir_plus:
        log.warning(
            "mount_fallback_overlay",
            guarantee="layers are passed in one mount(2) option string of at most 4 KiB, "
            "through short relative links; the number of layers is limited by that page",
        )
    if not beneath:
        log.warning(
            "mount_fallback_swap",
            guarantee="no atomic swap: between detaching the old overlay and moving in the "
            "prebuilt new one (well under a millisecond) the base hierarchy shows through",
        )
    return features


@dataclass(frozen=True)
class Upper:
    """Where overlay writes go: a writable volume, a tmpfs, or nowhere (read-only stack)."""

    kind: str  # "volume", "tmpfs", "none"
    root: str | None  # mounted directory holding upper/ and work/
    device: str  # what WritableDevice shows: device node, "tmpfs" or ""

    def upper_dir(self, hierarchy: str) -> str | None:
        return None if self.root is None else f"{self.root}/upper/{hierarchy_key(hierarchy)}"

    def work_parent(self, hierarchy: str) -> str | None:
        return None if self.root is None else f"{self.root}/work/{hierarchy_key(hierarchy)}"


@dataclass(frozen=True)
class OverlaySpec:
    layers: tuple[str, ...]  # lower directories, top first, the base reference last
    upper: str | None

    def to_json(self) -> dict[str, object]:
        return {"layers": list(self.layers), "upper": self.upper}


@dataclass
class MountedVolume:
    name: str
    identity: str
    devnode: str
    path: str


class Layout:
    """Where things live under `root`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mount_root = str(config.path(config.mount_root))
        self.runtime = str(config.path(config.runtime_dir))
        self.record_file = Path(self.runtime) / "stack.json"

    def hierarchy(self, h: str) -> str:
        return str(self.config.path(h))

    def base_ref(self, h: str) -> str:
        return f"{self.runtime}/base/{hierarchy_key(h)}"

    def volume_dir(self, name: str) -> str:
        return f"{self.mount_root}/{name}"

    def layer_dir(self, name: str, h: str) -> str:
        return f"{self.mount_root}/{name}{h}"

    def staging(self, h: str) -> str:
        return f"{self.runtime}/staging/{hierarchy_key(h)}"

    def links(self, h: str) -> str:
        return f"{self.runtime}/links/{hierarchy_key(h)}"


class Engine:
    def __init__(self, config: Config, features: MountFeatures) -> None:
        self.config = config
        self.features = features
        self.layout = Layout(config)
        self.volumes: dict[str, MountedVolume] = {}  # mounted at <mount_root>/<name>
        self.indexes: dict[str, VolumeIndex] = {}  # by volume identity
        self.specs: dict[str, OverlaySpec] = {}  # hierarchy -> what is mounted there now
        self.mount_ids: dict[str, int] = {}

    # -- start-up ------------------------------------------------------------------------

    def prepare_base_references(self) -> None:
        """Bind each hierarchy's base to `<runtime>/base/<h>` once, before anything is stacked
        on it, so later stacks can use the pristine base as their bottom layer."""
        entries = read_mountinfo()
        for h in self.config.hierarchies:
            ref = self.layout.base_ref(h)
            target = self.layout.hierarchy(h)
            os.makedirs(target, exist_ok=True)
            if mounts_at(entries, ref):
                continue
            ours = [e for e in mounts_at(entries, target) if _is_ours(e)]
            if ours:
                log.warning("base_reference_lost", hierarchy=h, stacked=len(ours))
                for _ in ours:
                    mounts.unmount(target)
            os.makedirs(ref, exist_ok=True)
            with mounts.clone_tree(target) as bind:
                mounts.attach(bind, ref)

    def adopt(self, volumes: Mapping[str, Volume]) -> None:
        """Take over what an earlier run left mounted: volume mounts that still match a
        present volume, and each hierarchy's overlay whose mount the runtime record names.
        Everything else of ours is unmounted, so nothing is orphaned."""
        record = self._read_record()
        entries = read_mountinfo()
        recorded_volumes = record.get("volumes", {})
        for name, info in recorded_volumes.items():
            path = self.layout.volume_dir(name)
            top = top_mount_at(entries, path)
            volume = volumes.get(name)
            if top is None:
                continue
            same_medium = volume is not None and info.get("identity") == volume.device.identity
            if volume is not None and same_medium and top.fs_type == volume.device.fs_type:
                self.volumes[name] = MountedVolume(
                    name, volume.device.identity, volume.device.devnode, path
                )
                continue
            log.info("orphan_volume_unmounted", name=name, path=path)
            _unmount_all(entries, path)
        self._unmount_unrecorded_volume_mounts(entries)
        for h in self.config.hierarchies:
            target = self.layout.hierarchy(h)
            stacked = [e for e in mounts_at(entries, target) if _is_ours(e)]
            while len(stacked) > 1:
                # A crash between "move beneath" and "detach old top" leaves two complete
                # stacks; dropping the top one reveals the other, which is complete too.
                log.warning("extra_overlay_unmounted", hierarchy=h)
                mounts.unmount(target)
                stacked.pop()
            if not stacked:
                continue
            info = record.get("hierarchies", {}).get(h) or {}
            layers, upper = info.get("layers"), info.get("upper")
            if (
                info.get("mount_id") == stacked[0].mount_id
                and isinstance(layers, list)
                and (upper is None or isinstance(upper, str))
            ):
                self.specs[h] = OverlaySpec(tuple(str(x) for x in layers), upper)
                self.mount_ids[h] = stacked[0].mount_id
            else:
                # Unknown layers: treated as something to replace at the next change.
                self.specs[h] = OverlaySpec(("<unknown>",), None)
                self.mount_ids[h] = stacked[0].mount_id
        log.info(
            "stack_adopted",
            volumes=sorted(self.volumes),
            hierarchies={h: len(s.layers) - 1 for h, s in self.specs.items()},
        )

    def _unmount_unrecorded_volume_mounts(self, entries: Sequence[MountEntry]) -> None:
        prefix = self.layout.mount_root + "/"
        for entry in entries:
            rest = entry.mount_point[len(prefix) :]
            if not entry.mount_point.startswith(prefix) or "/" in rest:
                continue
            if rest not in self.volumes:
                log.info("orphan_volume_unmounted", name=rest, path=entry.mount_point)
                _unmount_all(entries, entry.mount_point)

    def clean_work_dirs(self, upper: Upper, generation: int) -> None:
        """Remove the overlay work dirs of earlier generations from the writable volume."""
        for h in self.config.hierarchies:
            parent = upper.work_parent(h)
            if parent is None or not os.path.isdir(parent):
                continue
            for entry in os.listdir(parent):
                if entry != str(generation):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    # -- where writes go ------------------------------------------------------------------

    def writable_upper(self, device: BlockDevice) -> Upper:
        """Mount the writable volume at `<runtime>/writable` (once) and use it as upper."""
        path = f"{self.layout.runtime}/writable"
        top = top_mount_at(read_mountinfo(), path)
        if top is None or top.devnum != device.devnum:
            if top is not None:
                mounts.unmount(path)
            os.makedirs(path, mode=0o700, exist_ok=True)
            attrs = mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOSUID
            with mounts.mount_device_rw(
                device.devnode, device.fs_type, attrs, "writable volume"
            ) as detached:
                mounts.attach(detached, path)
            log.info("writable_mounted", device=device.devnode, path=path)
        return Upper("volume", path, device.devnode)

    def tmpfs_upper(self) -> Upper:
        """A volatile upper on a tmpfs at `<runtime>/volatile`, kept across generations."""
        path = f"{self.layout.runtime}/volatile"
        if top_mount_at(read_mountinfo(), path) is None:
            os.makedirs(path, mode=0o700, exist_ok=True)
            with mounts.mount_tmpfs(["mode=0755"], "volatile upper") as detached:
                mounts.attach(detached, path)
        return Upper("tmpfs", path, "tmpfs")

    def release_writable(self, keep: Upper) -> None:
        """Lazily unmount a writable volume or tmpfs that is no longer the upper."""
        entries = read_mountinfo()
        for kind in ("writable", "volatile"):
            path = f"{self.layout.runtime}/{kind}"
            in_use = any(s.upper and s.upper.startswith(path + "/") for s in self.specs.values())
            if keep.root != path and not in_use and top_mount_at(entries, path) is not None:
                mounts.unmount(path)
                log.info("upper_released", path=path)

    # -- the transaction -----------------------------------------------------------------

    def specs_for(self, plan: StackPlan, upper: Upper) -> dict[str, OverlaySpec | None]:
        wanted: dict[str, OverlaySpec | None] = {}
        for h in self.config.hierarchies:
            names = plan.layers.get(h, ())
            if not names:
                wanted[h] = None
                continue
            layers = tuple(self.layout.layer_dir(n, h) for n in names)
            wanted[h] = OverlaySpec((*layers, self.layout.base_ref(h)), upper.upper_dir(h))
        return wanted

    def is_current(self, plan: StackPlan, upper: Upper) -> bool:
        wanted = self.specs_for(plan, upper)
        return all(wanted[h] == self.specs.get(h) for h in self.config.hierarchies)

    async def index(self, volume: Volume, path: str) -> VolumeIndex:
        cached = self.indexes.get(volume.device.identity)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        index = await loop.run_in_executor(
            None, index_volume_packed, path, list(self.config.hierarchies)
        )
        self.indexes[volume.device.identity] = index
        release_free_memory()  # the walk's transient lists, so the resident set stays small
        log.info("volume_indexed", name=volume.name, entries=sum(map(len, index.values())))
        return index

    def forget_index(self, identity: str) -> None:
        self.indexes.pop(identity, None)

    async def mount_and_index(self, volumes: Sequence[Volume]) -> list[MountedVolume]:
        """Mount (if needed) and index each volume; returns the mounts made by this call.
        On failure, undoes its own mounts and raises MountFailed naming the volume."""
        made: list[MountedVolume] = []
        current: Volume | None = None
        to_index: list[tuple[Volume, str]] = []
        try:
            for volume in volumes:
                current = volume
                mounted = self.volumes.get(volume.name)
                if mounted is not None and mounted.identity != volume.device.identity:
                    self.unmount_volume(volume.name)
                    mounted = None
                if mounted is None:
                    mounted = self._mount_volume(volume)
                    made.append(mounted)
                to_index.append((volume, mounted.path))
            # The walks run side by side in worker threads: they are mostly kernel work
            # (directory blocks read and decompressed) done with the GIL released.
            outcomes = await asyncio.gather(
                *(self.index(v, path) for v, path in to_index), return_exceptions=True
            )
            for (volume, _), outcome in zip(to_index, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    current = volume
                    raise outcome
        except OSError as exc:
            for mounted in made:
                self.unmount_volume(mounted.name)
            assert current is not None
            raise MountFailed(
                f"cannot use volume '{current.name}' on {current.device.devnode}: {exc}"
            ) from exc
        return made

    def _mount_volume(self, volume: Volume) -> MountedVolume:
        path = self.layout.volume_dir(volume.name)
        os.makedirs(path, mode=0o755, exist_ok=True)
        device = volume.device
        options = volume_mount_options(device.fs_type, tuple(self.config.mount_options))
        existing = mounted_from_device(read_mountinfo(), device.devnum)
        if existing:
            # Mounting the device a second time could conflict with how it is mounted there
            # (e.g. ext4 read-write); a read-only bind of the existing mount cannot.
            detached = mounts.clone_tree(existing[0].mount_point)
            attrs, _ = mounts.split_options(options)
            mounts.set_attributes(detached, attrs | mounts.MOUNT_ATTR_RDONLY, 0)
        else:
            detached = mounts.mount_block_device(
                device.devnode, device.fs_type, options, f"volume '{volume.name}'"
            )
        with detached:
            mounts.attach(detached, path)
        mounted = MountedVolume(volume.name, device.identity, device.devnode, path)
        self.volumes[volume.name] = mounted
        log.info("volume_mounted", name=volume.name, device=device.devnode, path=path)
        return mounted

    def unmount_volume(self, name: str) -> MountedVolume | None:
        mounted = self.volumes.pop(name, None)
        if mounted is None:
            return None
        try:
            mounts.unmount(mounted.path)
        except OSError as exc:
            log.warning("volume_unmount_failed", name=name, error=str(exc))
        with contextlib.suppress(OSError):  # left alone if something else lives there
            os.rmdir(mounted.path)
        log.info("volume_unmounted", name=name, device=mounted.devnode)
        return mounted

    def conflict_report(self, plan: StackPlan, volumes: Mapping[str, Volume]) -> ConflictReport:
        """Conflicts and overrides of the planned stack, from the cached indexes."""
        conflicts: list[Conflict] = []
        overrides = 0
        for h in self.config.hierarchies:
            names = plan.layers.get(h, ())
            if not names:
                continue
            layers = [(n, self.indexes[volumes[n].device.identity].get(h, EMPTY)) for n in names]
            base = BaseNames(self.layout.base_ref(h))
            found, count = find_conflicts_packed(h, layers, base, self._identical_in(h))
            conflicts += found
            overrides += count
        conflicts.sort(key=lambda c: c.path)
        release_free_memory()
        return ConflictReport(tuple(conflicts), overrides)

    def _identical_in(self, h: str) -> Callable[[str, Sequence[str]], bool]:
        def identical(relpath: str, names: Sequence[str]) -> bool:
            return identical_entries([f"{self.layout.layer_dir(n, h)}/{relpath}" for n in names])

        return identical

    def build(
        self, wanted: Mapping[str, OverlaySpec | None], generation: int
    ) -> dict[str, mounts.Detached | str]:
        """Build every changed hierarchy's new overlay where nobody sees it.

        Returns per hierarchy a detached mount (new mount API) or a staging directory with
        the overlay mounted on it (legacy). On failure, whatever was built is released."""
        built: dict[str, mounts.Detached | str] = {}
        try:
            for h, spec in wanted.items():
                if spec is None or spec == self.specs.get(h):
                    continue
                work = self._fresh_work_dir(spec, h, generation)
                for layer in spec.layers:
                    if not os.path.isdir(layer):
                        raise OSError(2, f"layer {layer} is missing")
                if self.features.lowerdir_plus:
                    built[h] = mounts.mount_overlay(
                        spec.layers, spec.upper, work, f"overlay for {h} (generation {generation})"
                    )
                else:
                    staging = self.layout.staging(h)
                    os.makedirs(staging, exist_ok=True)
                    mounts.mount_overlay_legacy(
                        spec.layers, spec.upper, work, staging, self.layout.links(h)
                    )
                    built[h] = staging
        except OSError as exc:
            self.release(built)
            raise MountFailed(f"cannot build the overlay for {h}: {exc}") from exc
        return built

    def _fresh_work_dir(self, spec: OverlaySpec, h: str, generation: int) -> str | None:
        if spec.upper is None:
            return None
        os.makedirs(spec.upper, mode=0o755, exist_ok=True)
        work = os.path.join(os.path.dirname(os.path.dirname(spec.upper)), "work")
        work = os.path.join(work, hierarchy_key(h), str(generation))
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work, mode=0o700)
        return work

    def release(self, built: Mapping[str, mounts.Detached | str]) -> None:
        for item in built.values():
            if isinstance(item, mounts.Detached):
                item.close()
            else:
                try:
                    mounts.unmount(item)
                except OSError as exc:
                    log.warning("staging_unmount_failed", path=item, error=str(exc))

    def swap(
        self,
        wanted: Mapping[str, OverlaySpec | None],
        built: Mapping[str, mounts.Detached | str],
    ) -> None:
        """Put each built overlay in place of the old one; drop stacks no longer wanted."""
        for h, spec in wanted.items():
            target = self.layout.hierarchy(h)
            old = self.specs.get(h)
            if spec == old:
                continue
            if spec is None:
                mounts.unmount(target)
                self.specs.pop(h, None)
                self.mount_ids.pop(h, None)
                continue
            item = built[h]
            if old is not None and self.features.beneath:
                mounts.attach_any(item, target, beneath=True)
                mounts.unmount(target)
            else:
                if old is not None:
                    mounts.unmount(target)
                mounts.attach_any(item, target)
            self.specs[h] = spec
            top = top_mount_at(read_mountinfo(), target)
            self.mount_ids[h] = top.mount_id if top else -1
        self.release(built)

    def write_record(self, generation: int) -> None:
        record = {
            "generation": generation,
            "hierarchies": {
                h: {**spec.to_json(), "mount_id": self.mount_ids.get(h, -1)}
                for h, spec in self.specs.items()
            },
            "volumes": {
                v.name: {"identity": v.identity, "device": v.devnode} for v in self.volumes.values()
            },
        }
        tmp = self.layout.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.layout.record_file)

    def _read_record(self) -> dict[str, dict[str, dict[str, object]]]:
        try:
            data = json.loads(self.layout.record_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _is_ours(entry: MountEntry) -> bool:
    return entry.fs_type == "overlay" and entry.source == OVERLAY_SOURCE


def _unmount_all(entries: Sequence[MountEntry], path: str) -> None:
    for _ in mounts_at(entries, path):
        try:
            mounts.unmount(path)
        except OSError as exc:
            log.warning("unmount_failed", path=path, error=str(exc))
            return
