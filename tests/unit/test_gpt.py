"""core.gpt: GPT tables made by sfdisk and built here byte by byte (both sector sizes), damaged
tables refused with a reason, the DPS types checked against util-linux's own list, and the
choice of the partition that holds the tree."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalityd.core import gpt
from personalityd.core.gpt import GptError, Partition, parse_gpt, tree_partition

ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
USR_X86_64 = "8484680c-9521-48c6-9c11-b0720656f69e"
ROOT_ARM64 = "b921b045-1df0-41c3-af44-4c6f280d3fae"
USR_ARM64 = "b0e01050-ee5f-4390-949a-9101b17104e9"
LINUX_DATA = "0fc63daf-8483-4772-8e79-3d69d8477de4"
NO_AUTO = 1 << 63

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")


@dataclass
class Entry:
    type_uuid: str
    first_lba: int
    last_lba: int
    label: str = ""
    attributes: int = 0
    uuid: str = ""


def build_gpt(
    entries: list[Entry],
    *,
    sector_size: int = 512,
    entry_count: int = 128,
    entry_size: int = 128,
    disk_sectors: int = 4096,
    protective_mbr: bool = True,
) -> bytearray:
    """A disk image with a primary GPT and (optionally) a protective MBR; no backup table,
    which parse_gpt does not read."""
    disk = bytearray(disk_sectors * sector_size)
    if protective_mbr:
        struct.pack_into(
            "<B3sB3sII", disk, 446,
            0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(disk_sectors - 1, 0xFFFFFFFF),
        )  # fmt: skip
        disk[510:512] = b"\x55\xaa"
    array = bytearray(entry_count * entry_size)
    for index, entry in enumerate(entries):
        name = entry.label.encode("utf-16-le").ljust(72, b"\0")
        unique = uuid.UUID(entry.uuid) if entry.uuid else uuid.uuid4()
        struct.pack_into(
            "<16s16sQQQ72s", array, index * entry_size,
            uuid.UUID(entry.type_uuid).bytes_le, unique.bytes_le,
            entry.first_lba, entry.last_lba, entry.attributes, name,
        )  # fmt: skip
    array_sectors = -(-len(array) // sector_size)
    first_usable = 2 + array_sectors
    header = bytearray(92)
    struct.pack_into(
        "<8sIIIIQQQQ16sQIII", header, 0,
        b"EFI PART", 0x00010000, 92, 0, 0, 1, disk_sectors - 1,
        first_usable, disk_sectors - 1 - array_sectors - 1, uuid.uuid4().bytes_le,
        2, entry_count, entry_size, zlib.crc32(array),
    )  # fmt: skip
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    disk[sector_size : sector_size + len(header)] = header
    disk[2 * sector_size : 2 * sector_size + len(array)] = array
    return disk


def reader(data: bytes | bytearray) -> Callable[[int, int], bytes]:
    blob = bytes(data)
    return lambda offset, length: blob[offset : offset + length]


def rewrite_header(disk: bytearray, sector_size: int, **fields: int) -> None:
    """Change header fields and recompute the header CRC, so only the field is wrong."""
    offsets = {"my_lba": 24, "first_usable": 40, "last_usable": 48, "entries_lba": 72}
    sizes = {"header_size": 12, "entry_count": 80, "entry_size": 84}
    base = sector_size
    for name, value in fields.items():
        if name in offsets:
            struct.pack_into("<Q", disk, base + offsets[name], value)
        else:
            struct.pack_into("<I", disk, base + sizes[name], value)
    header_size = struct.unpack_from("<I", disk, base + 12)[0]
    struct.pack_into("<I", disk, base + 16, 0)
    crc = zlib.crc32(disk[base : base + min(header_size, sector_size)])
    struct.pack_into("<I", disk, base + 16, crc)


# -- reading tables --------------------------------------------------------------------------


@pytest.mark.parametrize("protective_mbr", [True, False], ids=["mbr", "no-mbr"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_both_sector_sizes(sector_size: int, protective_mbr: bool) -> None:
    disk = build_gpt(
        [
            Entry(LINUX_DATA, 256, 511, "data"),
            Entry(
                ROOT_X86_64, 512, 1023, "root-x86-64", uuid="12345678-1234-5678-9abc-def012345678"
            ),
        ],
        sector_size=sector_size,
        protective_mbr=protective_mbr,
    )
    partitions = parse_gpt(reader(disk))
    assert partitions is not None
    assert [p.label for p in partitions] == ["data", "root-x86-64"]
    root = partitions[1]
    assert root.type_uuid == ROOT_X86_64
    assert root.uuid == "12345678-1234-5678-9abc-def012345678"
    assert root.sector_size == sector_size
    assert root.offset == 512 * sector_size
    assert root.size == 512 * sector_size


@pytest.mark.skipif(shutil.which("fdisk") is None, reason="needs fdisk")
def test_the_4096_byte_builder_matches_fdisk(tmp_path: Path) -> None:
    """The byte builder above is itself checked: fdisk reads its 4096-byte table the same way."""
    image = tmp_path / "disk.raw"
    image.write_bytes(build_gpt([Entry(USR_ARM64, 300, 555, "u")], sector_size=4096))
    out = subprocess.run(
        ["fdisk", "-l", "-b", "4096", str(image)], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith(str(image)))
    assert line.split()[1:3] == ["300", "555"]
    assert "ARM-64" in line
    partitions = parse_gpt(reader(image.read_bytes()))
    assert partitions is not None
    assert [(p.first_lba, p.last_lba, p.type_uuid) for p in partitions] == [(300, 555, USR_ARM64)]


@needs_sfdisk
def test_a_table_made_by_sfdisk(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    script = (
        "label: gpt\n"
        f'start=2048, size=1MiB, type={LINUX_DATA}, name="data"\n'
        f'size=2MiB, type={USR_ARM64}, name="usr-arm64"\n'
        f'size=3MiB, type={ROOT_X86_64}, name="root-ü", attrs="GUID:63"\n'
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=script, text=True, check=True)
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, check=True).stdout
    )["partitiontable"]["partitions"]

    partitions = parse_gpt(reader(image.read_bytes()))

    assert partitions is not None
    assert [(p.first_lba, p.last_lba - p.first_lba + 1) for p in partitions] == [
        (t["start"], t["size"]) for t in table
    ]
    assert [p.type_uuid for p in partitions] == [t["type"].lower() for t in table]
    assert [p.uuid for p in partitions] == [t["uuid"].lower() for t in table]
    assert [p.label for p in partitions] == ["data", "usr-arm64", "root-ü"]
    assert [p.attributes for p in partitions] == [0, 0, NO_AUTO]
    assert partitions[1].offset == table[1]["start"] * 512
    assert partitions[1].size == 2 << 20


def test_entries_of_a_larger_size() -> None:
    disk = build_gpt(
        [Entry(LINUX_DATA, 100, 199, "a"), Entry(USR_X86_64, 200, 299, "b")],
        entry_size=256,
        entry_count=64,
    )
    partitions = parse_gpt(reader(disk))
    assert partitions is not None
    assert [(p.label, p.first_lba) for p in partitions] == [("a", 100), ("b", 200)]


def test_unused_entries_are_skipped() -> None:
    disk = build_gpt([Entry(LINUX_DATA, 100, 199, "a")])
    disk_with_gap = build_gpt(
        [Entry("00000000-0000-0000-0000-000000000000", 0, 0), Entry(LINUX_DATA, 100, 199, "a")]
    )
    for image in (disk, disk_with_gap):
        partitions = parse_gpt(reader(image))
        assert partitions is not None
        assert [p.label for p in partitions] == ["a"]


def test_an_empty_table() -> None:
    assert parse_gpt(reader(build_gpt([]))) == []


@pytest.mark.parametrize(
    "data",
    [b"", bytes(100), bytes(64 << 10), b"hsqs" + bytes(8192), b"\x55\xaa" * 4096],
    ids=["empty", "short", "zeros", "squashfs", "pattern"],
)
def test_no_gpt(data: bytes) -> None:
    assert parse_gpt(reader(data)) is None


def test_a_protective_mbr_alone_is_no_gpt() -> None:
    mbr = bytearray(64 << 10)
    mbr[446 + 4] = 0xEE
    mbr[510:512] = b"\x55\xaa"
    assert parse_gpt(reader(mbr)) is None


# -- damaged tables --------------------------------------------------------------------------


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_header_crc_mismatch(sector_size: int) -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199)], sector_size=sector_size)
    disk[sector_size + 40] ^= 0x01  # first usable LBA, CRC not updated
    with pytest.raises(GptError, match=r"header .* wrong CRC32"):
        parse_gpt(reader(disk))


def test_entry_array_crc_mismatch() -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199, "root")])
    disk[2 * 512 + 56] ^= 0x01  # a byte of the first entry's name
    with pytest.raises(GptError, match="entry array has a wrong CRC32"):
        parse_gpt(reader(disk))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"my_lba": 7}, "at LBA 7, not at LBA 1"),
        ({"entry_size": 100}, "entry size of 100"),
        ({"entry_size": 0}, "entry size of 0"),
        ({"header_size": 40}, "header size of 40"),
        ({"header_size": 600}, "header size of 600"),
        ({"entry_count": 100_000}, "more than"),
        ({"entries_lba": 0}, "impossible layout"),
        ({"entries_lba": 4090}, "cut short"),
        ({"last_usable": 150}, "outside the usable LBAs"),
    ],
)
def test_impossible_headers(fields: dict[str, int], reason: str) -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199)])
    rewrite_header(disk, 512, **fields)
    with pytest.raises(GptError, match=re.escape(reason)):
        parse_gpt(reader(disk))


def test_entry_array_cut_short_by_the_end_of_the_image() -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199)])
    with pytest.raises(GptError, match="cut short"):
        parse_gpt(reader(disk[: 2 * 512 + 1000]))


def test_header_cut_short() -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199)])
    with pytest.raises(GptError, match="cut short"):
        parse_gpt(reader(disk[: 512 + 60]))


def test_a_partition_ending_before_it_starts() -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 300, 200)])
    with pytest.raises(GptError, match=re.escape("partition 1 spans LBAs 300..200")):
        parse_gpt(reader(disk))


def test_a_damaged_512_header_does_not_hide_a_good_4096_table() -> None:
    disk = build_gpt([Entry(ROOT_X86_64, 100, 199, "root")], sector_size=4096)
    disk[512:520] = b"EFI PART"  # a stray signature at LBA 1 of 512-byte sectors
    partitions = parse_gpt(reader(disk))
    assert partitions is not None
    assert [(p.label, p.sector_size) for p in partitions] == [("root", 4096)]


# -- the DPS types and the choice of the tree partition ----------------------------------------

# systemd's architecture names -> util-linux's names of the same DPS types (`sfdisk -T`).
UTIL_LINUX_ARCHITECTURES = {
    "x86": "x86",
    "x86-64": "x86-64",
    "alpha": "Alpha",
    "arc": "ARC",
    "arm": "ARM",
    "arm64": "ARM-64",
    "ia64": "IA-64",
    "loongarch64": "LoongArch-64",
    "mips-le": "MIPS-32 LE",
    "mips64-le": "MIPS-64 LE",
    "ppc": "PPC",
    "ppc64": "PPC64",
    "ppc64-le": "PPC64LE",
    "riscv32": "RISC-V-32",
    "riscv64": "RISC-V-64",
    "s390": "S390",
    "s390x": "S390X",
    "tilegx": "TILE-Gx",
}


@needs_sfdisk
def test_dps_types_agree_with_util_linux() -> None:
    listing = subprocess.run(
        ["sfdisk", "--label", "gpt", "-T"], capture_output=True, text=True, check=True
    ).stdout
    known = {}
    for line in listing.splitlines():
        type_uuid, _, name = line.strip().partition(" ")
        known[name.strip()] = type_uuid.lower()
    for architecture, name in UTIL_LINUX_ARCHITECTURES.items():
        assert gpt.DPS_TREE_TYPES[architecture] == (
            known[f"Linux root ({name})"],
            known[f"Linux /usr ({name})"],
        ), architecture


def test_dps_types_util_linux_does_not_list() -> None:
    # Big-endian MIPS and PA-RISC, from the specification's table.
    assert gpt.DPS_TREE_TYPES["mips"] == (
        "e9434544-6e2c-47cc-bae2-12d6deafb44c",
        "773b2abc-2a99-4398-8bf5-03baac40d02b",
    )
    assert gpt.DPS_TREE_TYPES["mips64"] == (
        "d113af76-80ef-41b4-bdb6-0cff4d3d4a25",
        "57e13958-7331-4365-8e6e-35eeee17c61b",
    )
    assert gpt.DPS_TREE_TYPES["parisc"] == (
        "1aacdb3b-5444-4138-bd9e-e5c2239b2346",
        "dc4a4480-6917-4262-a4ec-db9384949f25",
    )
    assert set(gpt.DPS_TREE_TYPES) == {*UTIL_LINUX_ARCHITECTURES, "mips", "mips64", "parisc"}


def part(type_uuid: str, label: str, first: int = 100, attributes: int = 0) -> Partition:
    return Partition(type_uuid, str(uuid.uuid4()), label, first, first + 99, 512, attributes)


def test_root_is_preferred_over_usr_wherever_it_is() -> None:
    partitions = [part(USR_X86_64, "usr"), part(LINUX_DATA, "data"), part(ROOT_X86_64, "root")]
    assert tree_partition(partitions, "x86-64") == ("root", partitions[2])


def test_usr_when_there_is_no_root() -> None:
    partitions = [part(LINUX_DATA, "data"), part(USR_X86_64, "usr")]
    assert tree_partition(partitions, "x86-64") == ("usr", partitions[1])


def test_other_architectures_are_ignored() -> None:
    partitions = [part(ROOT_ARM64, "root-arm64"), part(USR_ARM64, "usr-arm64")]
    assert tree_partition(partitions, "x86-64") is None
    assert tree_partition(partitions, "arm64") == ("root", partitions[0])
    mixed = [part(ROOT_ARM64, "root-arm64"), part(USR_X86_64, "usr-x86-64")]
    assert tree_partition(mixed, "x86-64") == ("usr", mixed[1])


def test_the_first_of_two_roots() -> None:
    partitions = [part(ROOT_X86_64, "a", 100), part(ROOT_X86_64, "b", 300)]
    assert tree_partition(partitions, "x86-64") == ("root", partitions[0])


def test_no_auto_partitions_are_never_chosen() -> None:
    partitions = [part(ROOT_X86_64, "hidden", attributes=NO_AUTO), part(USR_X86_64, "usr")]
    assert tree_partition(partitions, "x86-64") == ("usr", partitions[1])
    assert tree_partition(partitions[:1], "x86-64") is None


def test_nothing_for_an_unknown_architecture_or_an_empty_table() -> None:
    assert tree_partition([part(ROOT_X86_64, "root")], "vax") is None
    assert tree_partition([], "x86-64") is None


def test_a_parsed_table_end_to_end() -> None:
    disk = build_gpt([Entry(LINUX_DATA, 256, 511), Entry(USR_X86_64, 512, 1023, "web")])
    partitions = parse_gpt(reader(disk))
    assert partitions is not None
    chosen = tree_partition(partitions, "x86-64")
    assert chosen is not None
    assert chosen[0] == "usr"
    assert (chosen[1].label, chosen[1].offset, chosen[1].size) == ("web", 512 * 512, 512 * 512)


# -- arbitrary input: a list, None or GptError, nothing else -----------------------------------


def outcome(data: bytes) -> object:
    try:
        return parse_gpt(reader(data))
    except GptError as exc:
        assert str(exc)
        return exc


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=10_000))
def test_random_bytes_never_crash(data: bytes) -> None:
    result = outcome(data)
    assert result is None or isinstance(result, list | GptError)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    sector_size=st.sampled_from([512, 4096]),
    flips=st.lists(st.tuples(st.integers(0, 3 * 4096 - 1), st.integers(1, 255)), max_size=8),
    fixed_crc=st.booleans(),
)
def test_damaged_tables_never_crash(
    sector_size: int, flips: list[tuple[int, int]], fixed_crc: bool
) -> None:
    disk = build_gpt(
        [Entry(ROOT_X86_64, 50, 60, "root"), Entry(LINUX_DATA, 70, 80)],
        sector_size=sector_size,
        entry_count=4,
        disk_sectors=100,
    )
    for position, mask in flips:
        disk[position % len(disk)] ^= mask
    if fixed_crc:
        rewrite_header(disk, sector_size)  # a damaged field behind a right CRC
    result = outcome(bytes(disk))
    assert result is None or isinstance(result, list | GptError)
    if isinstance(result, list):
        for partition in result:
            assert 0 <= partition.first_lba <= partition.last_lba
            assert partition.size > 0
