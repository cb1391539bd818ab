"""Mount primitives for the stack: the only place that changes mounts.

Base references (read-only), volume mounts at `<mount_root>/<name>`, the upper (writable
volume or tmpfs), detached overlays built where nobody sees them, and the swap that puts them
in place (the new overlay moved beneath the old one, then the old top lazily unmounted, so a
path under the hierarchy resolves to the old stack or to the new one, never to nothing). What
to mount and in which order is decided by stack/transaction.py.

Two things the swap keeps, whatever the volumes say:

- the hierarchy's face: the top directory of a stack has the base's mode, owner and group
  (the upper's root directory is set to them; a read-only stack whose top personality's
  directory differs gets an empty metadata layer with them on top, as systemd-sysext does);
- the mounts below the hierarchy: what a lookup below it reaches now (a bind mount on
  `/etc/resolv.conf`, a filesystem on `/usr/local`, a mount made on the stacked view) is
  cloned, with what is mounted inside it, onto the new overlay at the same path before the
  overlay is swapped in. On the last detach of a stack without an upper (with one, the
  hierarchy stays stacked: the upper over the base) the mounts that the base beneath does not
  hold already are put back on the base. A mount whose path the new stack lacks is set aside
  (in this process) and carried again when the path is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from personalityd.adapters import blockdev, mounts
from personalityd.adapters.imagefile import TREE_PROPERTY, USR_TREE
from personalityd.adapters.mountinfo import (
    MountEntry,
    is_our_overlay,
    mounted_from_device,
    mounts_at,
    read_mountinfo,
    top_mount_at,
)
from personalityd.adapters.probe import volume_mount_options
from personalityd.config import Config
from personalityd.core.errors import MountFailed
from personalityd.core.model import IMAGE_DIRECTORY, BlockDevice, StackPlan, Volume
from personalityd.core.names import hierarchy_key
from personalityd.stack.face import face_of, keep_face
from personalityd.stack.layout import Layout, MountedVolume, OverlaySpec, Upper
from personalityd.stack.submounts import Submounts

log = structlog.get_logger()


@dataclass(frozen=True)
class MountFeatures:
    lowerdir_plus: bool  # overlay layers appended one by one (Linux 6.8+)
    beneath: bool  # MOVE_MOUNT_BENEATH (Linux 6.5+)
    # Mounts can be attached inside a detached mount (Linux 6.15+); without it, an overlay
    # that has mounts to carry is attached on its staging directory first.
    detached_targets: bool = True


def detect_features(config: Config, scratch_dir: str) -> MountFeatures:
    """What the kernel offers, narrowed by the `stack.overlay_api` and `stack.swap` settings."""
    lowerdir_plus = config.overlay_api != "legacy" and mounts.kernel_supports_lowerdir_plus()
    if config.overlay_api == "lowerdir+" and not lowerdir_plus:
        raise MountFailed("stack.overlay_api is 'lowerdir+' but this kernel lacks it (6.8+)")
    beneath = config.swap != "replace" and mounts.kernel_supports_beneath(scratch_dir)
    if config.swap == "beneath" and not beneath:
        raise MountFailed("stack.swap is 'beneath' but this kernel lacks MOVE_MOUNT_BENEATH")
    detached_targets = lowerdir_plus and mounts.kernel_supports_detached_targets()
    features = MountFeatures(lowerdir_plus, beneath, detached_targets)
    log.info(
        "mount_features",
        overlay_api="lowerdir+" if lowerdir_plus else "legacy option string",
        swap="move beneath, then detach old top" if beneath else "detach old top, then move in",
        submounts="attached to the detached overlay"
        if detached_targets
        else "attached to the overlay on its staging directory",
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


class Engine:
    def __init__(self, config: Config, features: MountFeatures) -> None:
        self.config = config
        self.features = features
        self.layout = Layout(config)
        self.volumes: dict[str, MountedVolume] = {}  # mounted at <mount_root>/<name>
        self.specs: dict[str, OverlaySpec] = {}  # hierarchy -> what is mounted there now
        self.mount_ids: dict[str, int] = {}
        # hierarchy -> path below it -> a mount the last stack had no place for
        self.submounts = Submounts(self.layout, features.detached_targets)

    # -- start-up ------------------------------------------------------------------------

    def prepare_base_references(self) -> None:
        """Bind each hierarchy's base to `<runtime>/base/<h>` once, before anything is stacked
        on it, so later stacks can use the pristine base as their bottom layer.

        The bind is read-only (also one an earlier run left), so nothing done through it, not
        even `rm -rf` of the runtime directory, can change the base."""
        entries = read_mountinfo()
        for h in self.config.hierarchies:
            ref = self.layout.base_ref(h)
            target = self.layout.hierarchy(h)
            os.makedirs(target, exist_ok=True)
            ours = [e for e in mounts_at(entries, target) if is_our_overlay(e)]
            kept = mounts_at(entries, ref)
            if kept and (ours or _same_directory(ref, target)):
                mounts.set_attributes_at(ref, mounts.MOUNT_ATTR_RDONLY)
                continue
            if kept:
                # Nothing of ours is stacked and the hierarchy no longer shows what an earlier
                # run bound (a systemd-sysext merge unmerged since): kept, the stale base would
                # come back under the next stack, and hold the old merge's mounts.
                log.info("base_reference_renewed", hierarchy=h)
                for _ in kept:
                    mounts.unmount(ref)
            if ours:
                log.warning("base_reference_lost", hierarchy=h, stacked=len(ours))
                for _ in ours:
                    mounts.unmount(target)
            os.makedirs(ref, exist_ok=True)
            with mounts.clone_tree(target, read_only=True) as bind:
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
            if volume is not None and same_medium and _shows(entries, path, volume):
                self.volumes[name] = MountedVolume(
                    name, volume.device.identity, volume.device.devnode, path
                )
                continue
            log.info("orphan_volume_unmounted", name=name, path=path)
            _unmount_all(entries, path)
        self._unmount_unrecorded_volume_mounts(entries)
        self._remove_stale_volume_dirs()
        for h in self.config.hierarchies:
            target = self.layout.hierarchy(h)
            stacked = [e for e in mounts_at(entries, target) if is_our_overlay(e)]
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
            identities = info.get("identities", [])
            if (
                info.get("mount_id") == stacked[0].mount_id
                and isinstance(layers, list)
                and isinstance(identities, list)
                and (upper is None or isinstance(upper, str))
            ):
                self.specs[h] = OverlaySpec(
                    tuple(str(x) for x in layers), upper, tuple(str(x) for x in identities)
                )
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

    def _remove_stale_volume_dirs(self) -> None:
        """Empty mount points an earlier run left (it died between unmount and rmdir, or its
        orphans were just unmounted). rmdir takes only empty directories that are not mounted."""
        try:
            names = os.listdir(self.layout.mount_root)
        except OSError:
            return
        for name in names:
            if name not in self.volumes:
                with contextlib.suppress(OSError):
                    os.rmdir(self.layout.volume_dir(name))

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
        path = self.layout.writable()
        top = top_mount_at(read_mountinfo(), path)
        if top is None or top.devnum != device.devnum:
            if top is not None:
                mounts.unmount(path)
            os.makedirs(path, mode=0o700, exist_ok=True)
            attrs = mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOSUID
            blockdev.check_writable(device.devnode)
            with mounts.mount_device_rw(
                device.devnode, device.fs_type, attrs, "writable volume"
            ) as detached:
                mounts.attach(detached, path)
            log.info("writable_mounted", device=device.devnode, path=path)
        return Upper("volume", path, device.devnode)

    def tmpfs_upper(self) -> Upper:
        """A volatile upper on a tmpfs at `<runtime>/volatile`, kept across generations."""
        path = self.layout.volatile()
        if top_mount_at(read_mountinfo(), path) is None:
            os.makedirs(path, mode=0o700, exist_ok=True)
            with mounts.mount_tmpfs(["mode=0755"], "volatile upper") as detached:
                mounts.attach(detached, path)
        return Upper("tmpfs", path, "tmpfs")

    def release_writable(self, keep: Upper) -> None:
        """Lazily unmount a writable volume or tmpfs that is no longer the upper."""
        entries = read_mountinfo()
        for path in (self.layout.writable(), self.layout.volatile()):
            in_use = any(s.upper and s.upper.startswith(path + "/") for s in self.specs.values())
            kept = keep.root is not None and (keep.root + "/").startswith(path + "/")
            if not kept and not in_use and top_mount_at(entries, path) is not None:
                mounts.unmount(path)
                log.info("upper_released", path=path)

    # -- the transaction -----------------------------------------------------------------

    def specs_for(self, plan: StackPlan, upper: Upper) -> dict[str, OverlaySpec | None]:
        wanted: dict[str, OverlaySpec | None] = {}
        for h in self.config.hierarchies:
            names = plan.layers.get(h, ())
            base, upper_dir = self.layout.base_ref(h), upper.upper_dir(h)
            if not names and upper_dir is None:
                wanted[h] = None  # read-only and nothing to stack: the base itself
                continue
            # With an upper, every hierarchy is stacked, with or without personalities: a
            # write lands in one place and shows in every later generation.
            layers = tuple(self.layout.layer_dir(n, h) for n in names)
            # The overlay's root directory is the upper's, or else the top layer's.
            if upper_dir is None and face_of(layers[0]) != face_of(base):
                layers = (self.layout.meta(h), *layers)
            identities = tuple(self._identity(n) for n in names)
            wanted[h] = OverlaySpec((*layers, base), upper_dir, identities)
        return wanted

    def _identity(self, name: str) -> str:
        mounted = self.volumes.get(name)
        return mounted.identity if mounted is not None else ""

    def is_current(self, plan: StackPlan, upper: Upper) -> bool:
        wanted = self.specs_for(plan, upper)
        return all(wanted[h] == self.specs.get(h) for h in self.config.hierarchies)

    def mount_volume(self, volume: Volume, tree_fd: int | None = None) -> MountedVolume:
        """Mount `volume` read-only at `<mount_root>/<name>`: its block device, or with
        `tree_fd` a read-only bind of that open directory (a directory tree entry; its own
        submounts are not carried: what was probed is that one filesystem's tree)."""
        path = self.layout.volume_dir(volume.name)
        os.makedirs(path, mode=0o755, exist_ok=True)
        device = volume.device
        options = volume_mount_options(device.fs_type, tuple(self.config.mount_options))
        existing = (
            [] if tree_fd is not None else mounted_from_device(read_mountinfo(), device.devnum)
        )
        if tree_fd is not None:
            detached = mounts.clone_tree(f"/proc/self/fd/{tree_fd}")
            attrs, _ = mounts.split_options(options)
            mounts.set_attributes(detached, attrs | mounts.MOUNT_ATTR_RDONLY, 0)
        elif existing:
            # Mounting the device a second time could conflict with how it is mounted there
            # (e.g. ext4 read-write); a read-only bind of the existing mount cannot.
            detached = mounts.clone_tree(existing[0].mount_point)
            attrs, _ = mounts.split_options(options)
            mounts.set_attributes(detached, attrs | mounts.MOUNT_ATTR_RDONLY, 0)
        else:
            if volume.source is None:  # the daemon's own loop devices are read-only already
                blockdev.make_read_only(device.devnode, device.devnum)
            detached = mounts.mount_block_device(
                device.devnode, device.fs_type, options, f"volume '{volume.name}'"
            )
        with detached:
            if device.properties.get(TREE_PROPERTY) == USR_TREE:
                self._attach_under_usr(detached, path, volume.name)
            else:
                mounts.attach(detached, path)
        mounted = MountedVolume(volume.name, device.identity, device.devnode, path)
        self.volumes[volume.name] = mounted
        log.info("volume_mounted", name=volume.name, device=device.devnode, path=path)
        return mounted

    def _attach_under_usr(self, detached: mounts.Detached, path: str, name: str) -> None:
        """A "usr" partition's tree is what goes under usr/: the volume's mount is a small
        read-only tmpfs holding `usr`, with the partition mounted there (unmounted with it)."""
        with mounts.mount_tmpfs(["mode=0755", "size=64k"], f"tree of '{name}'") as wrapper:
            mounts.attach(wrapper, path)
        try:
            os.mkdir(os.path.join(path, "usr"), 0o755)
            attrs = mounts.MOUNT_ATTR_RDONLY | mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOSUID
            mounts.set_attributes_at(path, attrs)
            mounts.attach(detached, os.path.join(path, "usr"))
        except OSError:
            mounts.unmount(path)
            raise

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

    def build(
        self, wanted: Mapping[str, OverlaySpec | None], generation: int
    ) -> dict[str, mounts.Detached | str]:
        """Build every changed hierarchy's new overlay where nobody sees it.

        Returns per hierarchy a detached mount (new mount API) or a staging directory with
        the overlay mounted on it (legacy). On failure, whatever was built is released."""
        for h, spec in wanted.items():
            if spec is not None and len(spec.layers) > mounts.OVERLAY_MAX_LOWER:
                raise MountFailed(
                    f"{h} would have {len(spec.layers)} layers with the metadata layer that "
                    f"keeps the base's mode of {h} (the top personality's {h} differs); "
                    f"overlayfs allows at most {mounts.OVERLAY_MAX_LOWER}"
                )
        built: dict[str, mounts.Detached | str] = {}
        try:
            for h, spec in wanted.items():
                if spec is None or spec == self.specs.get(h):
                    continue
                work = self._fresh_work_dir(spec, h, generation)
                base, meta = self.layout.base_ref(h), self.layout.meta(h)
                keep_face(base, spec.upper, meta, spec.layers[0])
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
        """Put each built overlay in place of the old one; drop stacks no longer wanted.

        Always releases what of `built` was not swapped in. An OSError part-way leaves the
        hierarchies swapped so far swapped (the kernel refused a move; never seen): the caller
        converges from there."""
        pending = dict(built)
        try:
            for h, spec in wanted.items():
                target = self.layout.hierarchy(h)
                old = self.specs.get(h)
                if spec == old:
                    continue
                if spec is None:
                    self.submounts.unstack(h)
                    self.specs.pop(h, None)
                    self.mount_ids.pop(h, None)
                    continue
                item = pending[h] = self.submounts.carry(h, pending[h])
                if old is not None and self.features.beneath:
                    mounts.attach_any(item, target, beneath=True)
                    pending.pop(h)
                    mounts.unmount(target)
                else:
                    if old is not None:
                        mounts.unmount(target)
                    mounts.attach_any(item, target)
                    pending.pop(h)
                self.specs[h] = spec
                top = top_mount_at(read_mountinfo(), target)
                self.mount_ids[h] = top.mount_id if top else -1
        finally:
            self.release(pending)
            for item in built.values():  # descriptors of overlays now attached
                if isinstance(item, mounts.Detached):
                    item.close()

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


def _shows(entries: Sequence[MountEntry], path: str, volume: Volume) -> bool:
    """Whether the mounts at `path` are how `volume` is mounted (engine.mount_volume)."""
    if volume.source is not None and volume.source.kind == IMAGE_DIRECTORY:
        return True  # a bind mount of the directory: its filesystem's type, whatever it is
    device = volume.device
    if device.properties.get(TREE_PROPERTY) == USR_TREE:
        usr = top_mount_at(entries, os.path.join(path, "usr"))
        return usr is not None and usr.fs_type == device.fs_type
    top = top_mount_at(entries, path)
    return top is not None and top.fs_type == device.fs_type


def _unmount_all(entries: Sequence[MountEntry], path: str) -> None:
    for _ in mounts_at(entries, path):
        try:
            mounts.unmount(path)
        except OSError as exc:
            log.warning("unmount_failed", path=path, error=str(exc))
            return


def _same_directory(a: str, b: str) -> bool:
    """Whether two paths show the same directory (of the same mounted filesystem)."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
