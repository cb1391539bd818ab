"""The present block devices that matter: personality volumes by name, and the writable volume.

Fed by udev events (coldplug and live). Each device is probed once per identity (device
number and DISKSEQ) and content (adapters/medium.py): a device event, a rescan or a change
that finds the content key changed under the same identity (an image rewritten in place)
probes it again. Refusals are logged and journalled once per identity and content.

A volume the trust boundary refuses (adapters/probe.py: a set-id file under nosuid, a
symlinked hierarchy, a protected path, ...) is listed, as incompatible with a reason that
`force` does not override (`Volume.refusal`).

Personalities from search paths (stack/images.py) join the block devices in `volumes`: for
one name a block device wins over an image entry, except that a name attached from an image
file stays so until the next Refresh. The daemon's own loop devices are not block devices
here: they are their entry's.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Iterable, Sequence

import structlog

from personalityd.adapters.imagefile import directory_key
from personalityd.adapters.medium import content_key
from personalityd.adapters.probe import NotAPersonality, ProbeResult, Refuse, probe_device
from personalityd.adapters.protected import protected_in_tree
from personalityd.config import Config
from personalityd.core.desired import no_such_message, quoted
from personalityd.core.errors import NoSuchPersonality, Timeout
from personalityd.core.manifest import check_compatibility
from personalityd.core.matching import matched_only_by_fs_type, matches_any
from personalityd.core.model import IMAGE_DIRECTORY, BlockDevice, OsRelease, Volume
from personalityd.stack.images import ImageVolumes

log = structlog.get_logger()

WRITABLE_FS_TYPES = ("ext4", "xfs", "btrfs")  # can hold an overlay upper

RefusalSink = Callable[[str, str | None, str], object]  # device, name, reason


def _superseded(device: BlockDevice) -> bool:
    """Whether the kernel has changed `device`'s medium since the event that describes it (its
    DISKSEQ is higher now). udev handles events late and reads the device as it is then: an
    event of a loop device configured and released since (the daemon's own probes, a killed
    run's loops) can carry the backing file of a newer configuration and no filesystem type.
    Every change of DISKSEQ has an event of its own, which tells what the device is now."""
    if device.diskseq <= 0:
        return False
    try:
        with open(f"/sys/dev/block/{device.devnum[0]}:{device.devnum[1]}/diskseq") as f:
            now = int(f.read().strip())
    except (OSError, ValueError):
        return False  # gone (its remove event follows), or a kernel without DISKSEQ
    return now > device.diskseq


def protected_check(config: Config) -> Refuse:
    """Why a mounted tree may not be stacked by `volumes.protected_paths`, or None."""
    return functools.partial(
        protected_in_tree, protected=config.protected_paths, hierarchies=config.hierarchies
    )


class VolumeRegistry:
    def __init__(
        self,
        config: Config,
        base: OsRelease,
        refused: RefusalSink,
        images: ImageVolumes | None = None,
    ) -> None:
        self.config = config
        self.base = base
        self._refused_sink = refused
        self.images = images
        self.devices: dict[str, Volume] = {}  # personality volumes on block devices
        self.volumes: dict[str, Volume] = {}  # every present personality (see merge())
        self._lost: set[tuple[str, str]] = set()  # (loser, winner) already logged
        self._image_failed: dict[str, str] = {}  # what images.failures() said last
        self.writable: BlockDevice | None = None
        self.failed: dict[str, str] = {}  # name -> why its mount or index failed
        self._by_devnode: dict[str, BlockDevice] = {}  # every device we took a decision on
        self._refused: dict[str, str] = {}  # identity -> reason, to report each once
        self._content: dict[str, str] = {}  # identity -> content key when it was probed
        self._changed = asyncio.Condition()
        self._protected = protected_check(config)

    def known(self, device: BlockDevice) -> bool:
        seen = self._by_devnode.get(device.devnode)
        return seen is not None and seen.identity == device.identity

    def checked_content(self, volume: Volume) -> str | None:
        """The content key `volume` had when it was probed (None if never probed)."""
        if volume.source is not None and self.images is not None:
            return self.images.checked_content(volume)
        return self._content.get(volume.device.identity)

    def current_content(self, volume: Volume, mounted_at: str) -> str:
        """The content key of `volume` now, to hold against `checked_content` (blocking)."""
        if volume.source is not None and volume.source.kind == IMAGE_DIRECTORY:
            return directory_key(os.stat(mounted_at))
        key = self.images.current_content(volume) if self.images is not None else None
        return key if key is not None else content_key(volume.device)

    def merge(self) -> None:
        """`volumes` from the block devices and the image entries (see the module docstring);
        a losing image entry is logged once, naming both."""
        merged = dict(self.devices)
        if self.images is not None:
            bound = self.images.bound
            for name, volume in self.images.volumes().items():
                holder = merged.get(name)
                if holder is not None and name not in bound:
                    self._log_lost(volume, holder)
                    continue
                if holder is not None:
                    self._log_lost(holder, volume)
                merged[name] = volume
            failures = self.images.failures()
            for name in list(self.failed):
                if self.failed[name] == self._image_failed.get(name) and name not in failures:
                    del self.failed[name]  # the entry no longer fails
            for name, reason in failures.items():
                if merged.get(name) is not None and merged[name].source is not None:
                    self.failed[name] = reason
            self._image_failed = failures
        self.volumes = merged

    def _log_lost(self, loser: Volume, winner: Volume) -> None:
        key = (loser.device.devnode, winner.device.devnode)
        if key in self._lost:
            return
        self._lost.add(key)
        log.warning(
            "volume_name_taken",
            name=loser.name,
            ignored=loser.device.devnode,
            used=winner.device.devnode,
            reason="block devices come before image files, and search paths in order; a "
            "name attached from an image file keeps it until Refresh",
        )

    async def images_changed(self) -> bool:
        """Look at the search paths again; True when the present personalities changed."""
        if self.images is None:
            return False
        before = self.volumes
        await self.images.rescan()
        self.merge()
        if _presence(before) == _presence(self.volumes):
            return False
        await self._notify()
        return True

    def settle_images(self, mounted: set[str]) -> None:
        """Release the daemon's loop devices that no volume mount uses (stack/images.py)."""
        if self.images is not None and self.images.settle(mounted):
            self.merge()

    async def device_present(self, device: BlockDevice) -> bool:
        """A device was added or changed. Returns True when volumes or writable changed."""
        if self.images is not None and self.images.owns(device):
            return False  # one of our loop devices: its entry's, not a volume of its own
        if _superseded(device):
            return False
        previous = self._by_devnode.get(device.devnode)
        unchanged = previous is not None and previous.identity == device.identity
        if unchanged and self._still_matches(device) and not await self._content_changed(device):
            return False
        changed = self.device_gone(device.devnode) if previous is not None else False
        if not self._still_matches(device):
            return changed
        self._by_devnode[device.devnode] = device
        if matches_any(self.config.writable_match, device.properties):
            return self._writable_present(device) or changed
        volume = await self._probe(device)
        if volume is None:
            return changed
        holder = self.devices.get(volume.name)
        if holder is not None:
            self._refuse(
                device,
                volume.name,
                f"name '{volume.name}' is already used by {holder.device.devnode}",
            )
            return changed
        self.devices[volume.name] = volume
        self.failed.pop(volume.name, None)
        self.merge()
        log.info(
            "volume_found",
            name=volume.name,
            device=device.devnode,
            version=volume.manifest.version,
            incompatible=volume.incompatibility,
        )
        await self._notify()
        return True

    async def probe_again(self, volume: Volume) -> None:
        """Forget what was probed of `volume`'s device and probe it as it is now (its content
        changed since): it may come back as the same personality, another one, or refused."""
        if volume.source is not None and self.images is not None:
            log.warning("image_content_changed", name=volume.name, path=volume.source.entry)
            await self.images.probe_again(volume)
            self.merge()
            return
        device = self._by_devnode.get(volume.device.devnode, volume.device)
        log.warning("volume_content_changed", name=volume.name, device=device.devnode)
        self.device_gone(device.devnode)
        await self.device_present(device)

    async def _content_changed(self, device: BlockDevice) -> bool:
        """For a known volume device: whether its content key differs from the probed one."""
        checked = self._content.get(device.identity)
        if checked is None or matches_any(self.config.writable_match, device.properties):
            return False
        loop = asyncio.get_running_loop()
        now = await loop.run_in_executor(None, content_key, device)
        if now == checked:
            return False
        log.info("device_content_changed", device=device.devnode)
        return True

    def _still_matches(self, device: BlockDevice) -> bool:
        props = device.properties
        return matches_any(self.config.writable_match, props) or matches_any(
            self.config.volume_match, props
        )

    def _writable_present(self, device: BlockDevice) -> bool:
        if device.fs_type not in WRITABLE_FS_TYPES:
            self._refuse(
                device,
                None,
                f"writable volume has filesystem {device.fs_type or 'unknown'!r}; an overlay "
                f"upper needs one of {', '.join(WRITABLE_FS_TYPES)} (it is never formatted)",
            )
            return False
        if self.writable is not None and self.writable.devnode != device.devnode:
            log.warning("writable_ignored", device=device.devnode, using=self.writable.devnode)
            return False
        self.writable = device
        log.info("writable_found", device=device.devnode, fs_type=device.fs_type)
        return True

    def _probe_blocking(
        self, device: BlockDevice
    ) -> tuple[str, ProbeResult | NotAPersonality | OSError]:
        """(content key, outcome) of probing `device`; a worker thread runs this."""
        try:
            result = probe_device(
                device,
                tuple(self.config.mount_options),
                tuple(self.config.hierarchies),
                self._protected,
            )
        except (NotAPersonality, OSError) as exc:
            return content_key(device), exc
        return result.content, result

    async def _probe(self, device: BlockDevice) -> Volume | None:
        loop = asyncio.get_running_loop()
        key, outcome = await loop.run_in_executor(None, self._probe_blocking, device)
        self._content[device.identity] = key
        if isinstance(outcome, NotAPersonality):
            if matched_only_by_fs_type(self.config.volume_match, device.properties):
                log.debug("device_skipped", device=device.devnode, reason=str(outcome))
            else:
                self._refuse(device, None, str(outcome))
            return None
        if isinstance(outcome, OSError):
            self._refuse(device, None, f"cannot mount {device.fs_type or 'it'}: {outcome.strerror}")
            return None
        manifest = outcome.manifest
        reason = check_compatibility(manifest, self.base)
        if outcome.refusal is not None and manifest.name not in self.volumes:
            # Listed as incompatible, never stacked (else the name check says why not).
            self._refuse(device, manifest.name, outcome.refusal)
        return Volume(manifest.name, device, manifest, reason, outcome.refusal)

    def _refuse(self, device: BlockDevice, name: str | None, reason: str) -> None:
        if self._refused.get(device.identity) == reason:
            return
        self._refused[device.identity] = reason
        log.warning("volume_refused", device=device.devnode, name=name, reason=reason)
        self._refused_sink(device.devnode, name, reason)

    def device_gone(self, devnode: str) -> bool:
        """A device was removed (or re-used for another medium). True when that mattered."""
        device = self._by_devnode.pop(devnode, None)
        if device is None:
            return False
        self._refused.pop(device.identity, None)
        self._content.pop(device.identity, None)
        if self.writable is not None and self.writable.devnode == devnode:
            self.writable = None
            log.warning("writable_removed", device=devnode)
            return True
        for name, volume in list(self.devices.items()):
            if volume.device.devnode == devnode:
                del self.devices[name]
                self.failed.pop(name, None)
                self.merge()
                log.warning("volume_removed", name=name, device=devnode)
                return True
        return False

    def forget_missing(self, present: Iterable[BlockDevice]) -> bool:
        """After a rescan: drop every device that is not in `present`."""
        here = {d.devnode for d in present}
        changed = False
        for devnode in list(self._by_devnode):
            if devnode not in here:
                changed = self.device_gone(devnode) or changed
        return changed

    def usable(self) -> dict[str, Volume]:
        """Present volumes whose mount has not failed."""
        return {n: v for n, v in self.volumes.items() if n not in self.failed}

    def replace(self, name: str, volume: Volume) -> None:
        """Put `volume` (the same personality, judged again) in the place of the current one."""
        if self.devices.get(name) is not None and self.volumes.get(name) is self.devices[name]:
            self.devices[name] = volume
        self.volumes = {**self.volumes, name: volume}  # a new dict: readers may cache by it
        if volume.source is not None and self.images is not None:
            self.images.replace(volume)

    def mark_failed(self, name: str, reason: str) -> None:
        self.failed[name] = reason
        volume = self.volumes.get(name)
        if volume is not None:
            self._refused_sink(volume.device.devnode, name, reason)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, names: Sequence[str], timeout: float) -> None:
        """Wait until every name has a present volume; NoSuchPersonality or Timeout if not."""
        missing = [n for n in names if n not in self.volumes]
        if not missing:
            return
        if timeout <= 0:
            raise NoSuchPersonality(no_such_message(missing, self.volumes))

        async def all_present() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: all(n in self.volumes for n in names))

        try:
            await asyncio.wait_for(all_present(), timeout)
        except TimeoutError:
            missing = [n for n in names if n not in self.volumes]
            raise Timeout(
                f"no volume for {quoted(missing)} appeared within {timeout:g} s"
            ) from None


def _presence(volumes: dict[str, Volume]) -> dict[str, tuple[str, str, str | None]]:
    """What the listing shows of the present volumes."""
    return {
        n: (v.device.devnode, v.manifest.version, v.refusal or v.incompatibility)
        for n, v in volumes.items()
    }
