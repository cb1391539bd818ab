"""GUID partition tables read from bytes, and the partition of a disk image that holds the tree.

The daemon attaches a GPT disk image (as `systemd-repart --make-ddi=sysext` builds them) by
looping the byte range of one partition, so it reads the table itself rather than relying on
the kernel's partition support (which a kernel may lack, this project's test machine included).
Only the primary header at LBA 1 is read, for a sector size of 512 and of 4096 bytes; both the
header's and the entry array's CRC32 must be right. The protective MBR is not required.

Which partition holds the tree follows the Discoverable Partitions Specification (DPS): the
first "root" partition for the architecture (a root-relative tree), else the first "usr"
partition (what goes under `usr/`). Like systemd-dissect, a partition with the DPS "no-auto"
attribute (bit 63) is never chosen. Architectures are spelled as systemd spells them.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SECTOR_SIZES = (512, 4096)
SIGNATURE = b"EFI PART"

# Upper bound on the partition entry array read into memory; real tables use 16 KiB, and a
# header asking for more is damaged (or hostile) rather than a real disk image.
MAX_ENTRY_ARRAY_BYTES = 1 << 20
ENTRY_MIN_SIZE = 128

# DPS attribute bit 63: "do not mount this partition automatically".
GPT_FLAG_NO_AUTO = 1 << 63

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # up to and including the entry array CRC32
_ENTRY = struct.Struct("<16s16sQQQ72s")
_EMPTY_TYPE = "00000000-0000-0000-0000-000000000000"

# systemd architecture -> (root partition type, usr partition type), from the DPS
# (uapi-group/specifications, specs/discoverable_partitions_specification.md).
DPS_TREE_TYPES: dict[str, tuple[str, str]] = {
    "alpha": ("6523f8ae-3eb1-4e2a-a05a-18b695ae656f", "e18cf08c-33ec-4c0d-8246-c6c6fb3da024"),
    "arc": ("d27f46ed-2919-4cb8-bd25-9531f3c16534", "7978a683-6316-4922-bbee-38bff5a2fecc"),
    "arm": ("69dad710-2ce4-4e3c-b16c-21a1d49abed3", "7d0359a3-02b3-4f0a-865c-654403e70625"),
    "arm64": ("b921b045-1df0-41c3-af44-4c6f280d3fae", "b0e01050-ee5f-4390-949a-9101b17104e9"),
    "ia64": ("993d8d3d-f80e-4225-855a-9daf8ed7ea97", "4301d2a6-4e3b-4b2a-bb94-9e0b2c4225ea"),
    "loongarch64": (
        "77055800-792c-4f94-b39a-98c91b762bb6",
        "e611c702-575c-4cbe-9a46-434fa0bf7e3f",
    ),
    "mips": ("e9434544-6e2c-47cc-bae2-12d6deafb44c", "773b2abc-2a99-4398-8bf5-03baac40d02b"),
    "mips64": ("d113af76-80ef-41b4-bdb6-0cff4d3d4a25", "57e13958-7331-4365-8e6e-35eeee17c61b"),
    "mips-le": ("37c58c8a-d913-4156-a25f-48b1b64e07f0", "0f4868e9-9952-4706-979f-3ed3a473e947"),
    "mips64-le": (
        "700bda43-7a34-4507-b179-eeb93d7a7ca3",
        "c97c1f32-ba06-40b4-9f22-236061b08aa8",
    ),
    "parisc": ("1aacdb3b-5444-4138-bd9e-e5c2239b2346", "dc4a4480-6917-4262-a4ec-db9384949f25"),
    "ppc": ("1de3f1ef-fa98-47b5-8dcd-4a860a654d78", "7d14fec5-cc71-415d-9d6c-06bf0b3c3eaf"),
    "ppc64": ("912ade1d-a839-4913-8964-a10eee08fbd2", "2c9739e2-f068-46b3-9fd0-01c5a9afbcca"),
    "ppc64-le": ("c31c45e6-3f39-412e-80fb-4809c4980599", "15bb03af-77e7-4d4a-b12b-c0d084f7491c"),
    "riscv32": ("60d5a7fe-8e7d-435c-b714-3dd8162144e1", "b933fb22-5c3f-4f91-af90-e2bb0fa50702"),
    "riscv64": ("72ec70a6-cf74-40e6-bd49-4bda08e8f224", "beaec34b-8442-439b-a40b-984381ed097d"),
    "s390": ("08a7acea-624c-4a20-91e8-6e0fa67d23f9", "cd0f869b-d0fb-4ca0-b141-9ea87cc78d66"),
    "s390x": ("5eead9a9-fe09-4a1e-a1d7-520d00531306", "8a4f5770-50aa-4ed3-874a-99b710db6fea"),
    "tilegx": ("c50cdd70-3862-4cc3-90e1-809a8c93ee2c", "55497029-c7c1-44cc-aa39-815ed1558630"),
    "x86": ("44479540-f297-41b2-9af7-d131d5f0458a", "75250d76-8cc6-458e-bd66-bd47cc81a812"),
    "x86-64": ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "8484680c-9521-48c6-9c11-b0720656f69e"),
}


class GptError(Exception):
    """A GPT header is there (its signature is) but the table is damaged; str() says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Partition:
    """One used entry of a GPT; UUIDs in lower-case text form, LBAs inclusive."""

    type_uuid: str
    uuid: str
    label: str
    first_lba: int
    last_lba: int
    sector_size: int
    attributes: int = 0

    @property
    def offset(self) -> int:
        """Byte offset of the partition from the start of the disk image."""
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        """Length of the partition in bytes."""
        return (self.last_lba - self.first_lba + 1) * self.sector_size


def dps_type(kind: str, architecture: str) -> str:
    """The DPS partition type UUID of `kind` ("root" or "usr") for `architecture`; KeyError
    for an architecture the DPS has none for."""
    root, usr = DPS_TREE_TYPES[architecture]
    if kind == "root":
        return root
    if kind == "usr":
        return usr
    raise ValueError(f"unknown DPS tree partition kind {kind!r} (root or usr)")


def parse_gpt(read: Callable[[int, int], bytes]) -> list[Partition] | None:
    """The used partitions of the GPT that `read(offset, length)` gives access to.

    `read` may return fewer bytes than asked at the end of the image. None when there is no
    GPT signature at LBA 1 for either sector size; GptError when a signature is there but the
    table is damaged (bad CRC, impossible sizes, truncated, entries out of range).
    """
    damage: GptError | None = None
    for sector_size in SECTOR_SIZES:
        header = read(sector_size, sector_size)
        if header[: len(SIGNATURE)] != SIGNATURE:
            continue
        try:
            return _parse_at(read, header, sector_size)
        except GptError as exc:
            damage = damage or exc
    if damage is not None:
        raise damage
    return None


def _parse_at(
    read: Callable[[int, int], bytes], header: bytes, sector_size: int
) -> list[Partition]:
    where = f"GPT header for {sector_size}-byte sectors"
    if len(header) < _HEADER.size:
        raise GptError(f"{where} is cut short by the end of the image")
    (
        _signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alternate_lba,
        first_usable,
        last_usable,
        _disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(header)
    if not _HEADER.size <= header_size <= sector_size:
        raise GptError(f"{where} claims an impossible header size of {header_size} bytes")
    if len(header) < header_size:
        raise GptError(f"{where} is cut short by the end of the image")
    covered = bytearray(header[:header_size])
    covered[16:20] = bytes(4)
    if zlib.crc32(covered) != header_crc:
        raise GptError(f"{where} has a wrong CRC32 (damaged table)")
    if my_lba != 1:
        raise GptError(f"{where} says it is at LBA {my_lba}, not at LBA 1")
    if entry_size < ENTRY_MIN_SIZE or entry_size % ENTRY_MIN_SIZE:
        raise GptError(f"{where} has an impossible partition entry size of {entry_size} bytes")
    array_bytes = entry_count * entry_size
    if array_bytes > MAX_ENTRY_ARRAY_BYTES:
        raise GptError(
            f"{where} has a partition entry array of {array_bytes} bytes "
            f"(more than {MAX_ENTRY_ARRAY_BYTES})"
        )
    if entries_lba < 2 or first_usable > last_usable + 1:
        raise GptError(f"{where} has an impossible layout (entries at LBA {entries_lba}, "
                       f"usable LBAs {first_usable}..{last_usable})")  # fmt: skip
    array = read(entries_lba * sector_size, array_bytes) if array_bytes else b""
    if len(array) < array_bytes:
        raise GptError("the GPT partition entry array is cut short by the end of the image")
    if zlib.crc32(array) != entries_crc:
        raise GptError("the GPT partition entry array has a wrong CRC32 (damaged table)")
    partitions = []
    for index in range(entry_count):
        entry = _ENTRY.unpack_from(array, index * entry_size)
        partition = _partition(entry, sector_size)
        if partition is None:
            continue
        if not first_usable <= partition.first_lba <= partition.last_lba <= last_usable:
            raise GptError(
                f"GPT partition {index + 1} spans LBAs {partition.first_lba}.."
                f"{partition.last_lba}, outside the usable LBAs {first_usable}..{last_usable}"
            )
        partitions.append(partition)
    return partitions


def _partition(
    entry: tuple[bytes, bytes, int, int, int, bytes], sector_size: int
) -> Partition | None:
    type_bytes, unique_bytes, first_lba, last_lba, attributes, name = entry
    type_uuid = str(uuid.UUID(bytes_le=type_bytes))
    if type_uuid == _EMPTY_TYPE:
        return None
    label = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
    return Partition(
        type_uuid=type_uuid,
        uuid=str(uuid.UUID(bytes_le=unique_bytes)),
        label=label,
        first_lba=first_lba,
        last_lba=last_lba,
        sector_size=sector_size,
        attributes=attributes,
    )


def tree_partition(
    partitions: Sequence[Partition], architecture: str
) -> tuple[str, Partition] | None:
    """("root" | "usr", partition) of the partition that holds the tree for `architecture`.

    The first DPS root partition for the architecture wins over any usr partition; partitions
    of other architectures and partitions marked "no-auto" are ignored. None when there is
    neither (also for an architecture the DPS does not know).
    """
    types = DPS_TREE_TYPES.get(architecture)
    if types is None:
        return None
    candidates = [p for p in partitions if not p.attributes & GPT_FLAG_NO_AUTO]
    for kind, type_uuid in zip(("root", "usr"), types, strict=True):
        for partition in candidates:
            if partition.type_uuid == type_uuid:
                return kind, partition
    return None
