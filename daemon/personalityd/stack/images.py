"""Personalities from search paths: the entries found, and the loop devices the daemon made.

- `rescan()` lists the search paths (adapters/imagedirs.py) and looks at each winning entry:
  an entry unchanged since it was last looked at (same target inode, size and times) is
  kept; a new or changed one is opened, verified and probed through a short-lived loop
  device (adapters/imagefile.py). The personality is listed with the file's path as device.
- `attach(names)` makes the loop device of each entry a change is about to stack, from a
  fresh open of the entry that is verified again: the volume then has that loop device.
  An entry whose file changed since it was probed is probed again through the new loop.
- `settle(mounted)` closes the descriptors of the loops that no volume mount uses (autoclear
  then releases each as soon as the kernel lets go): after every change, failed or not.
- A name stays bound to its loop while attached, whatever happens to the entry, until
  `refresh_bindings()` (the Refresh method) lets go of those whose entry now resolves to a
  different file; the next change then attaches the new file in one transaction.
- The loops are recorded in `<runtime>/loops.json`; `adopt()` at start takes back those of an
  earlier run that still are what was recorded, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from personalityd.adapters.imagedirs import FoundEntry, scan_search_paths
from personalityd.adapters.imagefile import (
    EntryFailed,
    HeldLoop,
    Place,
    attach_file,
    directory_device,
    file_stand_in,
    open_entry,
    probe_directory,
    probe_loop,
)
from personalityd.adapters.imageformat import ImageLayout
from personalityd.adapters.loopdev import LoopDevice, loop_status
from personalityd.adapters.probe import NotAPersonality, ProbeResult, Refuse
from personalityd.adapters.trustedpath import Opened, UntrustedPath
from personalityd.core.manifest import check_compatibility
from personalityd.core.model import (
    IMAGE_DIRECTORY,
    IMAGE_FILE,
    BlockDevice,
    ImageSource,
    Manifest,
    OsRelease,
    Volume,
)
from personalityd.core.packed import PackedTree

log = structlog.get_logger()

VolumeIndex = dict[str, PackedTree]  # hierarchy -> index, as stack/indexes.py keeps them
RefusalSink = Callable[[str, str | None, str], object]  # device or path, name, reason
PROBES_AT_ONCE = 4  # entries probed side by side (each is mostly kernel work)


@dataclass(frozen=True)
class Entry:
    """What was found at an entry, as of its last look."""

    volume: Volume  # its stand-in device; `source` set
    content: str  # the content key of what was probed
    stamp: tuple[int, ...]  # the target's inode, size and times when it was probed
    failure: str | None = None  # why it cannot be used (listed as failed), or None
    # The index the probe's walk made (valid for a mount whose content key is `content`),
    # until a loop device is made of the entry: it then goes with that loop.
    index: VolumeIndex | None = field(default=None, compare=False, repr=False)


@dataclass
class Bound:
    """A loop device of the daemon's, and the volume it is."""

    held: HeldLoop
    volume: Volume
    content: str  # the content key it was checked with
    index: VolumeIndex | None = None  # the probe's index, until `take_index` hands it on


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


class ImageVolumes:
    def __init__(
        self,
        place: Place,
        search_paths: Sequence[str],
        base: OsRelease,
        record: Path,
        refused: RefusalSink,
        protected: Refuse | None,
    ) -> None:
        self.place = place
        self.search_paths = tuple(search_paths)
        self.base = base
        self.record = record
        self._refused_sink = refused
        self._protected = protected
        self.entries: dict[str, Entry] = {}  # name -> the winning entry's last look
        self.loops: dict[str, Bound] = {}  # identity -> a loop device of ours
        self.bound: dict[str, str] = {}  # name -> identity of the loop it is attached from
        self._own: set[tuple[str, int]] = set()  # (devnode, diskseq) of every loop we made
        self._reported: dict[str, str] = {}  # path -> refusal already journalled
        self._duplicates: set[tuple[str, str]] = set()
        self._recorded: tuple[str, ...] = ()  # identities in the loop record

    # -- what the registry asks ------------------------------------------------------------

    def owns(self, device: BlockDevice) -> bool:
        """Whether `device` is a loop device this daemon made (never a volume of its own)."""
        return (device.devnode, device.diskseq) in self._own

    def volumes(self) -> dict[str, Volume]:
        """Every image personality: attached ones as their loop device, others as found."""
        found = {name: entry.volume for name, entry in self.entries.items()}
        for name, identity in self.bound.items():
            found[name] = self.loops[identity].volume
        return found

    def failures(self) -> dict[str, str]:
        return {
            n: e.failure
            for n, e in self.entries.items()
            if e.failure is not None and n not in self.bound
        }

    def current_content(self, volume: Volume) -> str | None:
        """The content key of an attached image file now (blocking), from the backing file the
        daemon holds; None when `volume` is not one of its loop devices."""
        bound = self.loops.get(volume.device.identity)
        return None if bound is None else bound.held.content_key()

    def take_index(self, volume: Volume) -> tuple[VolumeIndex, str] | None:
        """The index the probe made of the file an attached `volume` is a loop of, with the
        content key it is valid for (once: the caller keeps it); None when there is none."""
        bound = self.loops.get(volume.device.identity)
        if bound is None or bound.index is None:
            return None
        index, bound.index = bound.index, None
        return index, bound.content

    def checked_content(self, volume: Volume) -> str | None:
        bound = self.loops.get(volume.device.identity)
        if bound is not None:
            return bound.content
        entry = self.entries.get(volume.name)
        if entry is not None and entry.volume.device.identity == volume.device.identity:
            return entry.content
        return None

    # -- finding entries -------------------------------------------------------------------

    async def rescan(self) -> bool:
        """List the search paths and look at every winning entry; True when the found
        personalities changed."""
        loop = asyncio.get_running_loop()
        place = self.place
        result = await loop.run_in_executor(
            None, scan_search_paths, place.root, self.search_paths, place.views
        )
        for refused in result.refused:
            self._refuse(refused.path, None, refused.reason)
        for loser, winner in result.duplicates:
            key = (loser.path, winner.path)
            if key not in self._duplicates:
                self._duplicates.add(key)
                log.warning(
                    "image_entry_duplicate", name=loser.name, ignored=loser.path, used=winner.path
                )
        previous = {e.volume.source.entry: e for e in self.entries.values() if e.volume.source}
        # One worker thread opens every entry and keeps those unchanged since their last look
        # (a thread hop per entry would keep the event loop, and readers, waiting); only the
        # new or changed ones are looked at again and probed, side by side.
        quick = await loop.run_in_executor(None, self._unchanged_all, result.entries, previous)
        gate = asyncio.Semaphore(PROBES_AT_ONCE)

        async def look(found: FoundEntry, kept: Entry | None) -> tuple[FoundEntry, Entry | None]:
            if kept is not None:
                return found, kept
            async with gate:
                before = previous.get(found.path)
                return found, await loop.run_in_executor(None, self._look, found, before)

        looks = await asyncio.gather(*(look(f, kept) for f, kept in quick))
        entries: dict[str, Entry] = {}
        for found, entry in looks:
            if entry is not None:
                entries[found.name] = entry
        changed = _listing(entries) != _listing(self.entries)
        for name, entry in entries.items():
            if self.entries.get(name) is not entry:
                log.info(
                    "image_found",
                    name=name,
                    path=entry.volume.device.devnode,
                    version=entry.volume.manifest.version,
                    incompatible=entry.volume.incompatibility,
                    failed=entry.failure,
                )
        for name in self.entries.keys() - entries.keys():
            log.info("image_gone", name=name)
        self.entries = entries
        return changed

    def _unchanged_all(
        self, entries: Sequence[FoundEntry], previous: dict[str, Entry]
    ) -> list[tuple[FoundEntry, Entry | None]]:
        """Per entry, its last look when the entry is unchanged since (`_unchanged`), else None
        (a worker thread): no descriptor is kept, however many entries there are."""
        return [(found, self._unchanged(found, previous.get(found.path))) for found in entries]

    def _unchanged(self, found: FoundEntry, before: Entry | None) -> Entry | None:
        """`before` when the entry still opens as the very file it was then; else None, and
        `_look` opens, checks and probes it (refusals are journalled there)."""
        if before is None:
            return None
        kind = IMAGE_DIRECTORY if found.kind == "dir" else IMAGE_FILE
        try:
            opened, source = open_entry(self.place, found.path, kind, found.rank)
        except (UntrustedPath, OSError):
            return None
        try:
            unchanged = before.stamp == _stamp(opened.st) and before.volume.source == source
        finally:
            os.close(opened.fd)
        return before if unchanged else None

    def _look(self, found: FoundEntry, before: Entry | None) -> Entry | None:
        """Open and, unless unchanged since `before`, probe one entry (a worker thread). None
        when the entry is refused (journalled once) or not a personality."""
        kind = IMAGE_DIRECTORY if found.kind == "dir" else IMAGE_FILE
        try:
            opened, source = open_entry(self.place, found.path, kind, found.rank)
        except (UntrustedPath, OSError) as exc:
            self._refuse(found.path, found.name, _reason(exc))
            return None
        try:
            stamp = _stamp(opened.st)
            if before is not None and before.stamp == stamp and before.volume.source == source:
                return before
            return self._probe(found, opened, source, stamp)
        finally:
            os.close(opened.fd)

    def _probe(
        self, found: FoundEntry, opened: Opened, source: ImageSource, stamp: tuple[int, ...]
    ) -> Entry | None:
        name = found.name
        try:
            if source.kind == IMAGE_DIRECTORY:
                device = directory_device(source, opened.st)
                result = probe_directory(self.place, opened, self._protected)
            else:
                held = attach_file(self.place, opened, source)
                self._own.add((held.loop.devnode, held.loop.diskseq))
                try:
                    result = self._probe_held(held)
                finally:
                    held.close()
                device = file_stand_in(source, held.layout.fs_type)
        except EntryFailed as exc:
            stand_in = file_stand_in(source, "")
            self._refuse(source.target, name, str(exc))
            failed = Volume(name, stand_in, Manifest(name, {}), source=source)
            return Entry(failed, "", stamp, failure=str(exc))
        except (NotAPersonality, OSError) as exc:
            self._refuse(source.target, None, _reason(exc))
            return None
        volume = self._volume(name, device, source, result)
        return None if volume is None else Entry(volume, result.content, stamp, index=result.index)

    def _probe_held(self, held: HeldLoop) -> ProbeResult:
        place = self.place
        return probe_loop(
            held, place.mount_options, place.hierarchies, self._protected, place.scratch
        )

    def _volume(
        self, name: str, device: BlockDevice, source: ImageSource, result: ProbeResult
    ) -> Volume | None:
        manifest = result.manifest
        if manifest.name != name:
            self._refuse(
                source.target,
                manifest.name,
                f"its manifest is for '{manifest.name}', but the entry "
                f"{os.path.basename(source.entry)} stands for '{name}'; the entry must be "
                "named after the personality it holds",
            )
            return None
        if result.refusal is not None:
            self._refuse(source.target, name, result.refusal)
        reason = check_compatibility(manifest, self.base)
        return Volume(name, device, manifest, reason, result.refusal, source=source)

    def _refuse(self, path: str, name: str | None, reason: str) -> None:
        if self._reported.get(path) == reason:
            return
        self._reported[path] = reason
        log.warning("image_refused", path=path, name=name, reason=reason)
        self._refused_sink(path, name, reason)

    # -- attaching -------------------------------------------------------------------------

    async def attach(self, names: Iterable[str]) -> dict[str, Volume | EntryFailed]:
        """Make the loop device of each named file entry that has none (directory trees need
        none): per name, the volume it now is, or why it failed."""
        wanted = [n for n in names if n in self.entries and n not in self.bound]
        outcomes: dict[str, Volume | EntryFailed] = {}
        loop = asyncio.get_running_loop()
        for name in wanted:
            entry = self.entries[name]
            source = entry.volume.source
            if source is None or source.kind != IMAGE_FILE or entry.failure is not None:
                continue
            try:
                bound = await loop.run_in_executor(None, self._attach_blocking, name, entry)
            except EntryFailed as exc:
                outcomes[name] = exc
                continue
            if bound is None:
                outcomes[name] = EntryFailed(
                    f"the entry of '{name}' changed since it was found and no longer holds it"
                )
                continue
            identity = bound.volume.device.identity
            self.loops[identity] = bound
            self.bound[name] = identity
            outcomes[name] = bound.volume
            log.info("image_attached", name=name, path=source.entry, device=bound.held.loop.devnode)
        if outcomes:
            self._write_record()
        return outcomes

    def _attach_blocking(self, name: str, entry: Entry) -> Bound | None:
        source = entry.volume.source
        assert source is not None
        try:
            opened, now = open_entry(self.place, source.entry, source.kind, source.rank)
        except (UntrustedPath, OSError) as exc:
            raise EntryFailed(_reason(exc)) from exc
        try:
            held = attach_file(self.place, opened, now)
            self._own.add((held.loop.devnode, held.loop.diskseq))
            try:
                stamp = _stamp(opened.st)
                volume, content, index = entry.volume, entry.content, entry.index
                if stamp != entry.stamp or now != source:
                    # Not the file that was probed: probe this one, through its own loop.
                    log.info("image_changed_before_attach", name=name, path=source.entry)
                    result = self._probe_held(held)
                    found = self._volume(name, held.device, now, result)
                    if found is None:
                        held.close()
                        return None
                    volume, content, index = found, result.content, result.index
                    self.entries[name] = Entry(
                        replace(found, device=file_stand_in(now, held.layout.fs_type)),
                        content,
                        stamp,
                    )
                elif index is not None:
                    self.entries[name] = replace(entry, index=None)  # it goes with the loop
                attached = replace(volume, device=held.device, source=now)
                return Bound(held, attached, content, index)
            except BaseException:
                held.close()
                raise
        except NotAPersonality as exc:
            raise EntryFailed(str(exc)) from exc
        finally:
            os.close(opened.fd)

    def open_directory(self, volume: Volume) -> int:
        """A descriptor of the directory tree `volume` was probed as (opened again through
        the ownership checks); OSError when the entry now is another directory."""
        source = volume.source
        assert source is not None and source.kind == IMAGE_DIRECTORY
        try:
            opened, now = open_entry(self.place, source.entry, source.kind, source.rank)
        except UntrustedPath as exc:
            raise OSError(errno.EPERM, str(exc)) from exc
        if now.file_id != source.file_id:
            os.close(opened.fd)
            raise OSError(errno.ESTALE, f"{source.entry} is another directory since it was found")
        return opened.fd

    def settle(self, mounted: set[str]) -> bool:
        """Let go of every loop of ours whose identity is not in `mounted` (the volume mounts
        of the stack). True when a name stopped being attached."""
        changed = False
        for identity, bound in list(self.loops.items()):
            if identity in mounted:
                continue
            bound.held.close()
            del self.loops[identity]
            name = bound.volume.name
            if self.bound.get(name) == identity:
                del self.bound[name]
                changed = True
            log.info("image_loop_released", name=name, device=bound.held.loop.devnode)
        if changed or len(self.loops) != len(self._recorded):
            self._write_record()
        return changed

    def refresh_bindings(self, taken: Collection[str] = ()) -> list[str]:
        """Let go of the attachment of every name whose entry now resolves to another file (or
        is gone), or that a block device now holds (`taken`: they come first): the next change
        attaches what the name is now. Returns those names."""
        updated: list[str] = []
        for name, identity in list(self.bound.items()):
            bound = self.loops[identity]
            entry = self.entries.get(name)
            if name not in taken and (
                entry is not None
                and entry.failure is None
                and entry.volume.source == bound.volume.source
                and entry.content == bound.content
            ):
                continue
            updated.append(name)
            del self.bound[name]
        if updated:
            log.info("images_updated", names=" ".join(updated))
        return updated

    def replace(self, volume: Volume) -> None:
        """The same personality judged again (a refusal added): keep that judgement."""
        bound = self.loops.get(volume.device.identity)
        if bound is not None:
            bound.volume = volume
            return
        entry = self.entries.get(volume.name)
        if entry is not None and entry.volume.device.identity == volume.device.identity:
            self.entries[volume.name] = replace(entry, volume=volume)

    async def probe_again(self, volume: Volume) -> None:
        """`volume` does not show what was probed (its file was written in place): probe it
        as it is now, through its mount when attached, else by looking at its entry again."""
        bound = self.loops.get(volume.device.identity)
        if bound is None:
            self.entries.pop(volume.name, None)
            await self.rescan()
            return
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, self._probe_held, bound.held)
        except (NotAPersonality, OSError) as exc:
            self._refuse(bound.held.loop.devnode, volume.name, _reason(exc))
            found = None
        else:
            assert volume.source is not None
            found = self._volume(volume.name, bound.held.device, volume.source, result)
        if found is None:
            self.bound.pop(volume.name, None)  # released at the next settle
            return
        bound.volume, bound.content = found, result.content

    # -- across restarts -------------------------------------------------------------------

    def _write_record(self) -> None:
        items = []
        for bound in self.loops.values():
            loop, source = bound.held.loop, bound.volume.source
            assert source is not None
            layout = bound.held.layout
            items.append(
                {
                    "name": bound.volume.name,
                    "devnode": loop.devnode,
                    "diskseq": loop.diskseq,
                    "backing": list(loop.backing),
                    "offset": loop.offset,
                    "size": loop.size,
                    "fs_type": layout.fs_type,
                    "tree": layout.tree,
                    "entry": source.entry,
                    "target": source.target,
                    "rank": source.rank,
                }
            )
        tmp = self.record.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(items, indent=1))
            os.replace(tmp, self.record)
        except OSError as exc:
            log.error("loop_record_not_written", path=str(self.record), error=str(exc))
        self._recorded = tuple(sorted(self.loops))

    def adopt(self) -> None:
        """Take back the loop devices an earlier run recorded, each only while it is still the
        very one recorded (same DISKSEQ and backing file); probe them as they are."""
        try:
            items = json.loads(self.record.read_text())
        except (OSError, ValueError):
            items = []
        for item in items if isinstance(items, list) else []:
            try:
                self._adopt_one(item)
            except (KeyError, TypeError, ValueError, OSError, NotAPersonality) as exc:
                log.warning("loop_not_adopted", item=str(item)[:200], error=str(exc))
        self._write_record()

    def _adopt_one(self, item: dict[str, object]) -> None:
        devnode, diskseq = str(item["devnode"]), int(str(item["diskseq"]))
        backing = tuple(int(str(x)) for x in item["backing"])  # type: ignore[attr-defined]
        status = loop_status(devnode)
        if status is None or status.diskseq != diskseq or status.backing != backing:
            log.info("loop_gone", devnode=devnode)
            return
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        again = loop_status(devnode)
        if again is None or again.diskseq != diskseq:  # released while we opened it
            os.close(fd)
            return
        layout = ImageLayout(
            fs_type=str(item["fs_type"]),
            offset=status.offset,
            size=status.size,
            tree=str(item.get("tree", "root")),
        )
        st = os.fstat(fd)
        loop = LoopDevice(
            devnode=devnode,
            devnum=(os.major(st.st_rdev), os.minor(st.st_rdev)),
            diskseq=diskseq,
            backing=(backing[0], backing[1]),
            offset=status.offset,
            size=status.size,
            direct_io=False,
        )
        held = HeldLoop(loop, fd, layout)
        self._own.add((devnode, diskseq))
        try:
            result = self._probe_held(held)
        except BaseException:
            held.close()
            raise
        name = str(item["name"])
        source = ImageSource(
            kind=IMAGE_FILE,
            entry=str(item["entry"]),
            target=str(item["target"]),
            file_id=(backing[0], backing[1]),
            rank=int(str(item["rank"])),
        )
        if result.manifest.name != name:
            held.close()
            return
        reason = check_compatibility(result.manifest, self.base)
        volume = Volume(name, held.device, result.manifest, reason, result.refusal, source=source)
        identity = volume.device.identity
        self.loops[identity] = Bound(held, volume, result.content)
        self.bound[name] = identity
        log.info("loop_adopted", name=name, device=devnode)

    def close(self) -> None:
        """Close every descriptor (at exit: the mounted loops stay, held by their mounts)."""
        for bound in self.loops.values():
            with contextlib.suppress(OSError):
                bound.held.close()


def _listing(entries: dict[str, Entry]) -> dict[str, tuple[object, ...]]:
    return {
        n: (e.volume.device.devnode, e.volume.manifest.fields, e.failure, e.volume.refusal)
        for n, e in entries.items()
    }


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc)
