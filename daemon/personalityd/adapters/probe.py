"""Recognising personality volumes: read the manifest of a block device without exposing it.

The device is mounted read-only as a detached mount (no mount point anywhere) and read through
the mount's file descriptor; closing the descriptor unmounts it. A device that is already
mounted elsewhere is read through that existing mount instead.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from personalityd.adapters import blockdev, mounts
from personalityd.adapters.mountinfo import mounted_from_device, read_mountinfo
from personalityd.core.errors import PersonalityError
from personalityd.core.manifest import (
    EXTENSION_RELEASE_DIRS,
    manifest_name_from_filename,
    parse_manifest,
)
from personalityd.core.model import BlockDevice, Manifest

MAX_MANIFEST_SIZE = 64 * 1024
SUPPORTED_FS_TYPES = ("squashfs", "erofs", "ext4", "ext3", "ext2", "xfs", "btrfs", "vfat")
# Per filesystem, the options that keep a read-only mount from replaying a journal or log
# onto the device (the kernel's read-only flag makes it refuse to mount instead). The others
# cannot write on a read-only mount: squashfs and erofs are read-only by design, ext2 and vfat
# have no journal (the kernel refuses `norecovery` for ext2).
NO_REPLAY_OPTIONS: dict[str, tuple[str, ...]] = {
    "ext4": ("norecovery",),
    "ext3": ("norecovery",),
    "xfs": ("norecovery",),
    "btrfs": ("rescue=nologreplay",),  # the bare `nologreplay` is gone from the new mount API
}


class NotAPersonality(Exception):
    """The device is not a usable personality volume; the message says why."""


@dataclass(frozen=True)
class ProbeResult:
    manifest: Manifest
    # Set-id regular files found when the volume options say nosuid (a few, root-relative):
    # overlayfs honours only the overlay mount's own nosuid, so through the stack they would
    # run set-id whatever the volume mount says; such a volume is refused.
    setid_files: tuple[str, ...] = ()
    # Why the volume may never be stacked, from the `refuse` check of probe_device; or None.
    refusal: str | None = None


MAX_SETID_REPORTED = 3


def find_setid_files(tree: str, limit: int = MAX_SETID_REPORTED) -> tuple[str, ...]:
    """Up to `limit` regular files with the set-user-ID or set-group-ID bit under `tree`.

    One lstat per regular file (d_type answers for the rest); symlinks are not followed."""
    found: list[str] = []
    stack = [tree]
    while stack and len(found) < limit:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and (
                    entry.stat(follow_symlinks=False).st_mode & (stat.S_ISUID | stat.S_ISGID)
                ):
                    found.append("/" + os.path.relpath(entry.path, tree))
                    if len(found) >= limit:
                        break
    return tuple(sorted(found))


def volume_mount_options(fs_type: str, options: tuple[str, ...]) -> tuple[str, ...]:
    """The configured options, forced read-only, plus what keeps a filesystem with a journal
    or log from replaying it onto the device."""
    forced = [o for o in options if o != "rw"]
    if "ro" not in forced:
        forced.append("ro")
    forced += [o for o in NO_REPLAY_OPTIONS.get(fs_type, ()) if o not in forced]
    return tuple(forced)


# A personality must not replace the base's identity (compatibility is checked against it,
# also at the next start, when the stacked /etc/os-release is what the daemon reads).
OS_RELEASE_PATHS = ("usr/lib/os-release", "etc/os-release")


def _real_dir(tree: str, rel: str) -> str | None:
    """`tree`/`rel` when every component is a real directory, not a symlink (which would be
    resolved against the daemon's root, outside the volume); else None."""
    path = tree
    for component in rel.split("/"):
        path = os.path.join(path, component)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def read_manifest(tree: str) -> Manifest:
    """Find exactly one extension-release file in a mounted tree and parse it."""
    for rel in OS_RELEASE_PATHS:
        if os.path.lexists(os.path.join(tree, rel)):
            raise NotAPersonality(f"it carries /{rel}, which would replace the base's")
    found: list[tuple[str, str]] = []
    for rel in EXTENSION_RELEASE_DIRS:
        directory = _real_dir(tree, rel)
        if directory is None:
            continue
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for filename in sorted(names):
            name = manifest_name_from_filename(filename)
            if name is not None:
                found.append((name, os.path.join(directory, filename)))
    if not found:
        raise NotAPersonality("no extension-release manifest found")
    if len(found) > 1:
        listed = ", ".join(os.path.basename(path) for _, path in found)
        raise NotAPersonality(f"more than one manifest ({listed})")
    name, path = found[0]
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not os.path.isfile(f"/proc/self/fd/{fd}") or os.fstat(fd).st_size > MAX_MANIFEST_SIZE:
            raise NotAPersonality(f"manifest {os.path.basename(path)} is not a small regular file")
        text = os.read(fd, MAX_MANIFEST_SIZE).decode("utf-8", errors="replace")
    finally:
        os.close(fd)
    try:
        return parse_manifest(name, text)
    except PersonalityError as exc:
        raise NotAPersonality(str(exc)) from exc


def probe_device(
    device: BlockDevice,
    mount_options: tuple[str, ...],
    refuse: Callable[[str], str | None] | None = None,
) -> ProbeResult:
    """Read the manifest of `device`. Raises NotAPersonality or OSError (mount failed).

    `refuse(tree)`, when given, looks at the mounted tree: its answer is `refusal`."""
    fs_type = device.fs_type
    if not fs_type:
        raise NotAPersonality("udev reports no filesystem type (ID_FS_TYPE)")
    if fs_type not in SUPPORTED_FS_TYPES:
        raise NotAPersonality(f"unsupported filesystem type {fs_type!r}")
    scan = "nosuid" in mount_options
    existing = mounted_from_device(read_mountinfo(), device.devnum)
    if existing:
        where = existing[0].mount_point
        manifest = read_manifest(where)
        refusal = refuse(where) if refuse else None
        return ProbeResult(manifest, find_setid_files(where) if scan else (), refusal)
    options = (*volume_mount_options(fs_type, mount_options), "noexec")
    blockdev.make_read_only(device.devnode, device.devnum)
    with mounts.mount_block_device(
        device.devnode, fs_type, options, f"probe of {device.devnode}"
    ) as detached:
        tree = f"/proc/self/fd/{detached.fd}"
        manifest = read_manifest(tree)
        refusal = refuse(tree) if refuse else None
        return ProbeResult(manifest, find_setid_files(tree) if scan else (), refusal)
