"""What an image file holds, read from its open file descriptor: filesystem, byte range, tree.

An image entry (docs/images.md) is a squashfs, erofs or ext4 filesystem image, or a GPT disk
image whose DPS "root" or "usr" partition for the host's architecture holds the filesystem.
Everything is read with pread on the descriptor the daemon verified and will loop, never by
path, so the layout found is the layout of the bytes that get attached.

Filesystems are recognised by their superblock magic: squashfs `hsqs` at byte 0, erofs
0xE0F5E1E2 (little-endian) at byte 1024, and the ext2/3/4 magic 0xEF53 at byte 1080. All three
ext generations are reported as "ext4": the daemon mounts them with the ext4 driver, which
mounts ext2 and ext3 filesystems too, and a filesystem using a feature the kernel lacks is
refused by the mount with the kernel's own reason.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from personalityd.core.gpt import GptError, Partition, parse_gpt, tree_partition

SQUASHFS_MAGIC = b"hsqs"
EROFS_MAGIC_OFFSET = 1024
EROFS_MAGIC = struct.pack("<I", 0xE0F5E1E2)
EXT_MAGIC_OFFSET = 1080
EXT_MAGIC = struct.pack("<H", 0xEF53)

_UNKNOWN = "unknown image format (neither squashfs, erofs, ext4 nor a GPT disk image)"


class ImageFormatError(Exception):
    """The image cannot be attached as it is; str() is the reason, naming the image."""


@dataclass(frozen=True)
class ImageLayout:
    """Where in the file the filesystem is, and which tree it holds.

    `size` 0 means to the end of the file. `tree` "root" is a root-relative tree (usr/..., etc/
    ...); "usr" is what goes under usr/ (a DPS usr partition).
    """

    fs_type: str  # "squashfs", "erofs" or "ext4"
    offset: int
    size: int
    tree: str
    partition_label: str = ""


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to `length` bytes at `offset`; fewer only at the end of the file."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


_MAGICS = (
    ("squashfs", 0, SQUASHFS_MAGIC),
    ("erofs", EROFS_MAGIC_OFFSET, EROFS_MAGIC),
    ("ext4", EXT_MAGIC_OFFSET, EXT_MAGIC),
)


def filesystem_at(fd: int, offset: int, size: int) -> str | None:
    """ "squashfs", "erofs" or "ext4" by the superblock magic in the `size` bytes at `offset`
    (a magic beyond them belongs to whatever follows, e.g. the next partition); None if none."""
    for fs_type, magic_offset, magic in _MAGICS:
        if magic_offset + len(magic) > size:
            continue
        if _pread_exact(fd, len(magic), offset + magic_offset) == magic:
            return fs_type
    return None


def detect_layout(fd: int, architecture: str, name: str) -> ImageLayout:
    """The layout of the image open as `fd`; `name` (e.g. "web.raw") names it in errors.

    `architecture` is systemd's spelling (x86-64, arm64) and chooses the GPT partition. Raises
    ImageFormatError for an unknown format, a damaged GPT, a GPT without a usable partition, a
    partition reaching past the end of the file, or a partition without a known filesystem.
    OSError from reading the file passes through.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageFormatError(f"{name} is not a regular file")
    fs_type = filesystem_at(fd, 0, st.st_size)
    if fs_type is not None:
        return ImageLayout(fs_type=fs_type, offset=0, size=0, tree="root")
    try:
        partitions = parse_gpt(lambda offset, length: _pread_exact(fd, length, offset))
    except GptError as exc:
        raise ImageFormatError(f"{name} is a GPT disk image with a damaged table: {exc}") from exc
    if partitions is None:
        raise ImageFormatError(f"{name}: {_UNKNOWN}")
    chosen = tree_partition(partitions, architecture)
    if chosen is None:
        raise ImageFormatError(
            f"{name} is a GPT disk image without a root or usr partition for {architecture}"
        )
    tree, partition = chosen
    return _partition_layout(fd, name, tree, partition, st.st_size)


def _partition_layout(
    fd: int, name: str, tree: str, partition: Partition, file_size: int
) -> ImageLayout:
    described = f"the {tree} partition{_label_text(partition)} of {name}"
    end = partition.offset + partition.size
    if end > file_size:
        raise ImageFormatError(
            f"{described} reaches past the end of the file (bytes {partition.offset}..{end}, "
            f"the file has {file_size})"
        )
    fs_type = filesystem_at(fd, partition.offset, partition.size)
    if fs_type is None:
        raise ImageFormatError(f"{described} holds no squashfs, erofs or ext4 filesystem")
    return ImageLayout(
        fs_type=fs_type,
        offset=partition.offset,
        size=partition.size,
        tree=tree,
        partition_label=partition.label,
    )


def _label_text(partition: Partition) -> str:
    return f" {partition.label!r}" if partition.label else ""
