"""One entry of a search path, the blocking part: open it as the root daemon must, verify it,
make the daemon's loop device from that same open file, and probe what it holds.

Every function here runs in a worker thread. The order of `attach` is the point of the module:

1. open the entry through adapters/trustedpath.py (root-owned and not writable by group or
   others, every directory and symlink on the way too), so what is opened is one inode that
   nobody but root could have written;
2. verify that open file (`images.verify`): its SHA-256 is computed from the descriptor, and
   compared with `SHA256SUMS` beside the entry (itself opened the same way and, when signed,
   checked with gpgv first, from the very bytes that are then parsed);
3. read its layout (filesystem image, or the tree partition of a GPT disk image) from that
   descriptor, and configure a read-only, autoclear loop device from it (adapters/loopdev.py).

A file renamed over the entry at any moment is either the one opened (and verified, and
attached) or not seen at all; never half of each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from personalityd.adapters import mounts
from personalityd.adapters.imageformat import ImageFormatError, ImageLayout, detect_layout
from personalityd.adapters.loopdev import LoopDevice, attach_read_only
from personalityd.adapters.medium import content_key
from personalityd.adapters.mountinfo import mounted_from_device, read_mountinfo
from personalityd.adapters.probe import (
    NotAPersonality,
    ProbeResult,
    Refuse,
    may_hold_xattrs,
    probe_tree,
    probe_tree_indexed,
    volume_mount_options,
)
from personalityd.adapters.trustedpath import Opened, UntrustedPath, Want, open_trusted
from personalityd.adapters.verify import (
    KEYRING_PATHS,
    SIGNATURE_NAME,
    SUMS_NAME,
    VerificationFailed,
    check_listed,
    check_signature,
    file_digest,
    missing_keyring_message,
)
from personalityd.core.model import IMAGE_DIRECTORY, BlockDevice, ImageSource

MAX_SUMS_SIZE = 1024 * 1024
USR_TREE = "usr"  # a GPT "usr" partition: its root is what goes under usr/
TREE_PROPERTY = "PERSONALITYD_TREE"  # set to USR_TREE on the device of such a partition


class EntryFailed(Exception):
    """The entry cannot be used (verification, format, a loop device); the message says why.
    The personality is listed `failed` with it."""


@dataclass(frozen=True)
class Place:
    """Where entries are read: `root`, and the base directories read instead of stacked
    hierarchies (`views`, adapters/trustedpath.py), with the settings that apply."""

    root: str
    views: Mapping[str, str]
    verify: str  # "none", "checksum", "signed"
    architecture: str
    mount_options: tuple[str, ...]
    hierarchies: tuple[str, ...]
    scratch: str  # a private directory for probes (under the runtime directory)

    def relative(self, logical: str) -> str:
        """`<root>/var/lib/x` -> `/var/lib/x` (what open_trusted takes)."""
        root = self.root.rstrip("/")
        if root and logical.startswith(root + "/"):
            return logical[len(root) :]
        return logical


class HeldLoop:
    """A loop device the daemon made, with the descriptor that keeps it configured (autoclear:
    it goes once this is closed and nothing mounts it)."""

    def __init__(
        self, loop: LoopDevice, fd: int, layout: ImageLayout, backing_fd: int | None = None
    ) -> None:
        self.loop = loop
        self.fd = fd
        self.layout = layout
        # The backing file, held so that its content key is that file's, whatever its path
        # names later (None for a loop adopted from an earlier run: judged by its path).
        self.backing_fd = backing_fd

    @property
    def device(self) -> BlockDevice:
        device = self.loop.block_device(self.layout.fs_type)
        if self.layout.tree == USR_TREE:
            properties = {**device.properties, TREE_PROPERTY: USR_TREE}
            device = dataclasses.replace(device, properties=properties)
        return device

    def content_key(self) -> str:
        return content_key(self.device, self.backing_fd)

    def close(self) -> None:
        for fd in (self.fd, self.backing_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd, self.backing_fd = -1, None


def open_entry(place: Place, entry: str, kind: str, rank: int) -> tuple[Opened, ImageSource]:
    """Open the entry (`kind` IMAGE_FILE or IMAGE_DIRECTORY); UntrustedPath or OSError."""
    want: Want = "dir" if kind == IMAGE_DIRECTORY else "file"
    opened = open_trusted(place.root, place.relative(entry), place.views, want=want)
    source = ImageSource(
        kind=kind,
        entry=entry,
        target=opened.logical_path,
        file_id=(opened.st.st_dev, opened.st.st_ino),
        rank=rank,
    )
    return opened, source


def verify_file(place: Place, opened: Opened, source: ImageSource) -> None:
    """Check the open file against `SHA256SUMS` beside the entry (and its signature) as
    `images.verify` says; raises EntryFailed naming the cause."""
    if place.verify == "none":
        return
    directory = os.path.dirname(source.entry)
    sums = _read_beside(place, os.path.join(directory, SUMS_NAME), "the checksum list")
    if place.verify == "signed":
        signature = _read_beside(place, os.path.join(directory, SIGNATURE_NAME), "the signature")
        keyring = _open_keyring(place)
        try:
            check_signature(sums, signature, f"/proc/self/fd/{keyring}", directory)
        except VerificationFailed as exc:
            raise EntryFailed(str(exc)) from exc
        finally:
            os.close(keyring)
    # The symlink's target as listed (sysupdate lists versioned files), else the entry's name.
    names = list(dict.fromkeys([os.path.basename(source.target), os.path.basename(source.entry)]))
    try:
        check_listed(file_digest(opened.fd), sums, names, directory)
    except VerificationFailed as exc:
        raise EntryFailed(str(exc)) from exc
    except OSError as exc:
        raise EntryFailed(f"cannot read {source.target}: {exc.strerror}") from exc


def _open_keyring(place: Place) -> int:
    """A descriptor of the first import keyring there is, read from the base and held to the
    same ownership rules as the images; EntryFailed when there is none."""
    for relative in KEYRING_PATHS:
        try:
            opened = open_trusted(place.root, "/" + relative, place.views, want="file")
        except FileNotFoundError:
            continue
        except (UntrustedPath, OSError) as exc:
            raise EntryFailed(f"the import keyring cannot be used: {exc}") from exc
        return opened.fd
    raise EntryFailed(missing_keyring_message(Path(place.root)))


def _read_beside(place: Place, path: str, what: str) -> bytes:
    try:
        opened = open_trusted(place.root, place.relative(path), place.views, want="file")
    except FileNotFoundError:
        raise EntryFailed(
            f"images.verify is {place.verify!r}, but {path} ({what}) does not exist"
        ) from None
    except (UntrustedPath, OSError) as exc:
        raise EntryFailed(f"{what} cannot be used: {exc}") from exc
    try:
        if opened.st.st_size > MAX_SUMS_SIZE:
            raise EntryFailed(f"{path} is larger than {MAX_SUMS_SIZE // 1024} KiB")
        return os.pread(opened.fd, MAX_SUMS_SIZE + 1, 0)
    finally:
        os.close(opened.fd)


def attach_file(place: Place, opened: Opened, source: ImageSource) -> HeldLoop:
    """Verify the open file, read its layout and make its loop device; EntryFailed."""
    verify_file(place, opened, source)
    name = os.path.basename(source.target)
    try:
        layout = detect_layout(opened.fd, place.architecture, name)
    except ImageFormatError as exc:
        raise EntryFailed(str(exc)) from exc
    except OSError as exc:
        raise EntryFailed(f"cannot read {source.target}: {exc.strerror}") from exc
    try:
        loop, fd = attach_read_only(opened.fd, offset=layout.offset, size=layout.size)
    except OSError as exc:
        raise EntryFailed(
            f"cannot make a loop device of {source.target}: {exc.strerror or exc}"
        ) from exc
    return HeldLoop(loop, fd, layout, os.dup(opened.fd))


def probe_loop(
    held: HeldLoop,
    mount_options: Sequence[str],
    hierarchies: Sequence[str],
    refuse: Refuse | None,
    scratch: str,
) -> ProbeResult:
    """Probe the tree on the loop device; the content key is the loop's (the same for any loop
    over the same unchanged file and byte range). Through a detached mount of a filesystem
    image, the walk also makes the volume's index (ProbeResult.index; adapters/probe.py
    `scan_and_index`), which a later mount may use while its content key is this one.

    Read through the daemon's own mount of the loop when there is one (an attached volume),
    else through a detached mount that nobody sees; a "usr" partition's tree through a
    private directory in `scratch` that holds the mount as its `usr`."""
    device = held.device
    options = (*volume_mount_options(device.fs_type, tuple(mount_options)), "noexec")
    before = held.content_key()
    index = None
    try:
        existing = mounted_from_device(read_mountinfo(), device.devnum)
        if existing:
            tree = existing[0].mount_point
            if held.layout.tree == USR_TREE:
                tree = os.path.dirname(tree)
            manifest, refusal = probe_tree(tree, mount_options, hierarchies, refuse)
        elif held.layout.tree == USR_TREE:
            with (
                mounts.mount_block_device(
                    device.devnode, device.fs_type, options, f"probe of {device.devnode}"
                ) as detached,
                _usr_tree(detached, scratch) as tree,
            ):
                manifest, refusal = probe_tree(tree, mount_options, hierarchies, refuse)
        else:
            # Read before the mount, within the content keys taken around the probe: what
            # the kernel mounts is what was read here.
            xattrs = may_hold_xattrs(device)
            with mounts.mount_block_device(
                device.devnode, device.fs_type, options, f"probe of {device.devnode}"
            ) as detached:
                tree = f"/proc/self/fd/{detached.fd}"
                manifest, refusal, index = probe_tree_indexed(
                    tree, mount_options, hierarchies, refuse, xattrs
                )
    except OSError as exc:
        raise EntryFailed(
            f"cannot mount {held.layout.fs_type} from it: {exc.strerror or exc}"
        ) from exc
    if held.content_key() != before:
        raise NotAPersonality("its content changed while it was checked")
    return ProbeResult(manifest, before, refusal, index)


@contextlib.contextmanager
def _usr_tree(detached: mounts.Detached, scratch: str) -> Iterator[str]:
    """A directory whose `usr` is the detached mount (a "usr" partition), for the probe."""
    os.makedirs(scratch, mode=0o700, exist_ok=True)
    tree = tempfile.mkdtemp(prefix="usr-tree-", dir=scratch)
    usr = os.path.join(tree, "usr")
    os.mkdir(usr, 0o755)
    try:
        mounts.attach(detached, usr)
        try:
            yield tree
        finally:
            mounts.unmount(usr)
    finally:
        os.rmdir(usr)  # nothing is mounted there any more: a plain, empty directory
        os.rmdir(tree)


def directory_key(st: os.stat_result) -> str:
    """The content key of a directory tree: its inode and times (a change deeper down is not
    seen; directory trees are for development, and refused under verification)."""
    return f"dir={st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def directory_device(source: ImageSource, st: os.stat_result) -> BlockDevice:
    """The stand-in device of a directory tree: its path, and an identity from its inode."""
    return BlockDevice(
        devnode=source.target,
        devnum=(os.major(st.st_dev), os.minor(st.st_dev)),
        properties={"ID_FS_TYPE": "directory"},
        diskseq=st.st_ino,
    )


def probe_directory(place: Place, opened: Opened, refuse: Refuse | None) -> ProbeResult:
    """Probe a directory tree through its open descriptor."""
    if place.verify != "none":
        raise EntryFailed(
            f"images.verify is {place.verify!r}: a directory tree cannot be verified (only "
            "image files listed in SHA256SUMS can)"
        )
    tree = f"/proc/self/fd/{opened.fd}"
    manifest, refusal = probe_tree(tree, place.mount_options, place.hierarchies, refuse)
    return ProbeResult(manifest, directory_key(opened.st), refusal)


def file_stand_in(source: ImageSource, fs_type: str) -> BlockDevice:
    """The device an image file is listed with while not attached: its path."""
    return BlockDevice(devnode=source.target, devnum=(0, 0), properties={"ID_FS_TYPE": fs_type})
