"""GPT disk images holding a personality in a DPS "root" or "usr" partition, built with sfdisk.

They stand for what `systemd-repart --make-ddi=sysext` builds: a GPT whose partition of the
Discoverable Partitions Specification type for the architecture holds a squashfs or erofs
filesystem. By default an unrelated partition, filled with a marker pattern, comes first, so a
reader that takes the wrong offset sees garbage rather than the filesystem.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from testkit.images import pack_image
from testkit.processes import run

MIB = 1 << 20
# "Linux filesystem data": not a DPS tree partition for any architecture.
LINUX_DATA_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"
FILLER_LABEL = "unrelated-data"
FILLER_PATTERN = b"not the tree partition\n"

# DPS partition types (root, usr), copied from the specification rather than taken from the
# daemon, so that a test built on them checks the daemon's table.
DPS_TYPES = {
    "x86-64": ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "8484680c-9521-48c6-9c11-b0720656f69e"),
    "x86": ("44479540-f297-41b2-9af7-d131d5f0458a", "75250d76-8cc6-458e-bd66-bd47cc81a812"),
    "arm64": ("b921b045-1df0-41c3-af44-4c6f280d3fae", "b0e01050-ee5f-4390-949a-9101b17104e9"),
    "arm": ("69dad710-2ce4-4e3c-b16c-21a1d49abed3", "7d0359a3-02b3-4f0a-865c-654403e70625"),
    "riscv64": ("72ec70a6-cf74-40e6-bd49-4bda08e8f224", "beaec34b-8442-439b-a40b-984381ed097d"),
    "ppc64-le": ("c31c45e6-3f39-412e-80fb-4809c4980599", "15bb03af-77e7-4d4a-b12b-c0d084f7491c"),
    "s390x": ("5eead9a9-fe09-4a1e-a1d7-520d00531306", "8a4f5770-50aa-4ed3-874a-99b710db6fea"),
    "loongarch64": (
        "77055800-792c-4f94-b39a-98c91b762bb6",
        "e611c702-575c-4cbe-9a46-434fa0bf7e3f",
    ),
}


def dps_type(kind: str, architecture: str) -> str:
    """The DPS type UUID of a `kind` ("root"/"usr") partition for `architecture`."""
    root, usr = DPS_TYPES[architecture]
    return {"root": root, "usr": usr}[kind]


def build_disk_image(
    tree: Path,
    out: Path,
    *,
    kind: str = "root",
    fs: str = "squashfs",
    architecture: str = "x86-64",
    label: str | None = None,
    filler_partition: bool = True,
) -> Path:
    """Build a GPT disk image `out` whose DPS `kind` partition for `architecture` holds `tree`.

    `tree` is root-relative (`usr/...`, `etc/...`). For `kind="root"` all of it is packed; for
    `kind="usr"` the partition holds what is under `tree/usr` (as a usr partition does), and a
    tree with anything beside `usr` is refused rather than silently cut. `fs` is `squashfs` or
    `erofs`; the partition is labelled `label` (default `<kind>-<architecture>`). With
    `filler_partition` a 1 MiB partition of another type, filled with `FILLER_PATTERN`, comes
    first. The GPT has 512-byte sectors: this sfdisk (util-linux 2.38) has no `--sector-size`,
    and writes a table for 4096-byte sectors only onto a device that has them. Returns `out`.
    """
    source = _packed_tree(tree, kind)
    fs_image = out.with_name(f".{out.name}.{fs}")
    try:
        pack_image(source, fs_image, fs)
        fs_bytes = fs_image.read_bytes()
    finally:
        fs_image.unlink(missing_ok=True)
    partition_mib = -(-len(fs_bytes) // MIB)
    # 1 MiB for the primary table and alignment, the partitions, 1 MiB for the backup table.
    total_mib = 1 + (1 if filler_partition else 0) + partition_mib + 1
    with open(out, "wb") as f:
        f.truncate(total_mib * MIB)
    # Explicit starts: on a disk this small sfdisk would not align partitions to 1 MiB.
    sectors_per_mib = MIB // 512
    lines = ["label: gpt"]
    start = sectors_per_mib
    if filler_partition:
        lines.append(f'start={start}, size=1MiB, type={LINUX_DATA_TYPE}, name="{FILLER_LABEL}"')
        start += sectors_per_mib
    tree_label = label if label is not None else f"{kind}-{architecture}"
    lines.append(
        f"start={start}, size={partition_mib}MiB, type={dps_type(kind, architecture)}, "
        f'name="{tree_label}"'
    )
    script = "\n".join(lines) + "\n"
    _sfdisk(out, script)
    starts = partition_offsets(out)
    with open(out, "r+b") as f:
        if filler_partition:
            f.seek(starts[0][0])
            f.write((FILLER_PATTERN * (MIB // len(FILLER_PATTERN) + 1))[:MIB])
        f.seek(starts[-1][0])
        f.write(fs_bytes)
        f.flush()
        os.fsync(f.fileno())
    return out


def partition_offsets(image: Path) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition of `image`, as `sfdisk --json` reads them."""
    table = json.loads(run("sfdisk", "--json", image))
    sector = int(table["partitiontable"].get("sectorsize", 512))
    return [
        (p["start"] * sector, p["size"] * sector) for p in table["partitiontable"]["partitions"]
    ]


def _packed_tree(tree: Path, kind: str) -> Path:
    if kind == "root":
        return tree
    if kind != "usr":
        raise ValueError(f"kind must be 'root' or 'usr', not {kind!r}")
    others = sorted(entry.name for entry in tree.iterdir() if entry.name != "usr")
    if others:
        raise AssertionError(f"a usr partition holds only usr/: {tree} also has {others}")
    return tree / "usr"


def _sfdisk(image: Path, script: str) -> None:
    proc = subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
        input=script, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"sfdisk failed on {image}: {proc.stderr.strip()}\n{script}")
