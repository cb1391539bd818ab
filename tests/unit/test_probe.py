"""The probe's checks on a tree (adapters/probe.py): what the trust boundary refuses, and how
volume files are read. Trees in tmp_path stand in for mounted volumes; the integration corpus
(tests/integration/test_hostile_volumes.py) runs the same checks on real images."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

import pytest

from personalityd.adapters.probe import (
    NotAPersonality,
    may_hold_xattrs,
    read_manifest,
    read_regular,
    scan_tree,
    symlinked_hierarchy,
)
from personalityd.core.model import BlockDevice

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mknod and security.* xattrs need root")


def tree(tmp_path: Path, files: dict[str, bytes]) -> Path:
    top = tmp_path / "vol"
    for rel, data in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    top.mkdir(exist_ok=True)
    return top


def scan(top: Path, nosuid: bool = True, nodev: bool = True, xattrs: bool = True) -> str | None:
    return scan_tree(str(top), nosuid=nosuid, nodev=nodev, xattrs=xattrs)


def test_a_plain_tree_passes(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/bin/tool": b"x", "etc/conf": b"y"})
    os.symlink("/etc/shadow", top / "usr/bin/out")
    os.mkfifo(top / "usr/bin/fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(top / "usr/bin/sock"))
    assert scan(top) is None
    assert symlinked_hierarchy(str(top), ["/usr", "/etc"]) is None


@pytest.mark.parametrize(
    ("mode", "bits"),
    [(0o4755, "set-user-ID"), (0o2755, "set-group-ID"), (0o6755, "set-user-ID, set-group-ID")],
)
def test_set_id_files_are_refused_under_nosuid_only(tmp_path: Path, mode: int, bits: str) -> None:
    top = tree(tmp_path, {"usr/bin/plain": b"x", "usr/lib/x/su": b"x"})
    os.chmod(top / "usr/lib/x/su", mode)
    reason = scan(top)
    assert reason is not None
    assert reason.startswith(f"it holds a set-id file, /usr/lib/x/su ({bits}); ")
    assert "nosuid" in reason
    assert scan(top, nosuid=False) is None


def test_a_set_id_directory_is_not_a_set_id_file(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/share/group-dir/f": b"x"})
    os.chmod(top / "usr/share/group-dir", 0o2775)
    assert scan(top) is None


@needs_root
def test_file_capabilities_are_refused_under_nosuid(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/bin/cat": b"\x7fELF"})
    os.chmod(top / "usr/bin/cat", 0o644)  # not even executable: refused all the same
    # VFS_CAP_REVISION_2, effective, permitted = CAP_DAC_READ_SEARCH (bit 2)
    os.setxattr(
        top / "usr/bin/cat", "security.capability", struct.pack("<IIIII", 0x02000001, 4, 0, 0, 0)
    )
    reason = scan(top)
    assert reason is not None and "/usr/bin/cat (security.capability)" in reason
    assert scan(top, nosuid=False) is None
    # A filesystem known to hold no xattrs is not asked file by file (squashfs, below).
    assert scan(top, xattrs=False) is None


@needs_root
@pytest.mark.parametrize(
    ("kind", "numbers", "what"),
    [(stat.S_IFCHR, (1, 3), "character device 1:3"), (stat.S_IFBLK, (7, 0), "block device 7:0")],
)
def test_device_nodes_are_refused_under_nodev(
    tmp_path: Path, kind: int, numbers: tuple[int, int], what: str
) -> None:
    top = tree(tmp_path, {"usr/share/x": b"x"})
    os.mknod(top / "usr/share/node", kind | 0o600, os.makedev(*numbers))
    reason = scan(top)
    assert reason is not None and f"/usr/share/node ({what})" in reason
    assert "nodev" in reason
    assert scan(top, nodev=False) is None


@needs_root
def test_a_whiteout_is_not_a_device_node(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/share/x": b"x"})
    os.mknod(top / "usr/share/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert scan(top) is None


def test_odd_names_are_shown_escaped(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/bin/" + os.fsdecode(b"a\nb\xff"): b"x"})
    os.chmod(top / ("usr/bin/" + os.fsdecode(b"a\nb\xff")), 0o4755)
    reason = scan(top)
    assert reason is not None and "/usr/bin/a\\nb\\udcff (set-user-ID)" in reason


def test_symlinked_hierarchies_at_any_component(tmp_path: Path) -> None:
    top = tree(tmp_path, {"etc/x": b"x"})
    os.symlink("/tmp", top / "usr")
    assert symlinked_hierarchy(str(top), ["/usr"]) == (
        "its /usr is a symlink (to '/tmp'); a stacked hierarchy must be a real directory of "
        "the volume, or the layer would be whatever the link points to"
    )
    (top / "opt").mkdir()
    os.symlink("../etc", top / "opt/app")
    reason = symlinked_hierarchy(str(top), ["/etc", "/opt/app/sub"])
    assert reason is not None and reason.startswith("its /opt/app is a symlink (to '../etc')")
    # Missing or not a directory: the volume just does not provide it.
    (top / "var").write_bytes(b"file")
    assert symlinked_hierarchy(str(top), ["/srv", "/var", "/var/lib"]) is None


def test_read_regular_opens_only_regular_files(tmp_path: Path) -> None:
    top = tree(tmp_path, {"m": b"ID=_any\n", "big": b"x" * 70_000})
    assert read_regular(str(top / "m"), 1024) == b"ID=_any\n"
    os.mkfifo(top / "fifo")  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(NotAPersonality, match=r"fifo is not a regular file \(it is a FIFO\)"):
        read_regular(str(top / "fifo"), 1024)
    os.symlink("m", top / "link")
    with pytest.raises(NotAPersonality, match=r"it is a symlink"):
        read_regular(str(top / "link"), 1024)
    with pytest.raises(NotAPersonality, match=r"big is larger than 64 KiB"):
        read_regular(str(top / "big"), 64 * 1024)


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    top = tree(tmp_path, {"usr/bin/x": b"x"})
    (top / "usr/lib/extension-release.d").mkdir(parents=True)
    os.mkfifo(top / "usr/lib/extension-release.d/extension-release.f")
    with pytest.raises(NotAPersonality, match=r"extension-release.f is not a regular file"):
        read_manifest(str(top))


def test_manifests_are_looked_for_in_real_directories_only(tmp_path: Path) -> None:
    """A `usr` that is a symlink to the host's /usr is not searched for a manifest (the
    symlinked hierarchy is refused on its own); os-release is a protected path, checked
    with the others."""
    top = tree(tmp_path, {"etc/extension-release.d/extension-release.v": b"ID=_any\n"})
    os.symlink("/usr", top / "usr")
    assert read_manifest(str(top)).name == "v"


def _squashfs_head(xattr_table: int) -> bytes:
    head = bytearray(96)
    head[0:4] = b"hsqs"
    head[56:64] = struct.pack("<Q", xattr_table)
    return bytes(head)


@pytest.mark.parametrize(
    ("fs_type", "head", "expected"),
    [
        ("squashfs", _squashfs_head(0xFFFF_FFFF_FFFF_FFFF), False),
        ("squashfs", _squashfs_head(4096), True),
        ("squashfs", b"not a squashfs superblock".ljust(96, b"\0"), True),
        ("erofs", _squashfs_head(0xFFFF_FFFF_FFFF_FFFF), True),
    ],
)
def test_only_a_squashfs_without_xattr_table_is_known_to_hold_none(
    tmp_path: Path, fs_type: str, head: bytes, expected: bool
) -> None:
    image = tmp_path / "image"
    image.write_bytes(head + bytes(4096))
    device = BlockDevice(str(image), (0, 0), {"ID_FS_TYPE": fs_type})
    assert may_hold_xattrs(device) is expected
