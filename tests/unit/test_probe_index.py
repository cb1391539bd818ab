"""The probe's walk that also indexes (adapters/probe.py `scan_and_index`): the refusal must be
exactly `scan_tree`'s and the index exactly `index_volume_packed`'s, on generated trees in
tmp_path standing in for mounted volumes (set-id files, FIFOs, symlinks, opaque directories,
xattr whiteouts, hierarchies missing or not directories)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from personalityd.adapters.indexer import index_volume_packed
from personalityd.adapters.probe import scan_and_index, scan_tree
from personalityd.config import Config
from personalityd.core.model import BlockDevice, Manifest, Volume
from personalityd.core.packed import PackedTree
from personalityd.stack.indexes import VolumeIndexes
from personalityd.stack.layout import Layout

ROOT = os.geteuid() == 0
HIERARCHIES = ("/usr", "/etc")
KINDS = ("file", "dir", "symlink", "fifo", "setuid", "setgid", "opaque", "xwhiteouts", "xwo")
NAMES = st.sampled_from(["usr", "etc", "bin", "lib", "a", "b", "local", "x y", "\udcff"])


def layout(packed: PackedTree) -> tuple[object, ...]:
    return (
        packed.dirs,
        packed.dir_kinds,
        list(packed.name_offsets),
        list(packed.kind_offsets),
        packed.names,
        packed.kinds,
    )


def make(top: Path, entries: list[tuple[list[str], str]]) -> None:
    for parts, kind in entries:
        path = top.joinpath(*parts)
        if os.path.lexists(path):
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            continue  # a parent is a file already: the entry cannot be there
        if kind in ("dir", "opaque", "xwhiteouts"):
            path.mkdir()
            if ROOT and kind == "opaque":
                os.setxattr(path, "trusted.overlay.opaque", b"y")
            if ROOT and kind == "xwhiteouts":
                os.setxattr(path, "trusted.overlay.opaque", b"x")
        elif kind == "symlink":
            os.symlink("/etc/shadow", path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.write_bytes(b"" if kind == "xwo" else b"x")
            if kind == "setuid":
                os.chmod(path, 0o4755)
            elif kind == "setgid":
                os.chmod(path, 0o2755)
            elif ROOT and kind == "xwo":
                os.setxattr(path, "trusted.overlay.whiteout", b"")


def check(top: Path, hierarchies: tuple[str, ...]) -> None:
    for nosuid in (True, False):
        for nodev in (True, False):
            refusal, index = scan_and_index(str(top), hierarchies, nosuid=nosuid, nodev=nodev)
            assert refusal == scan_tree(str(top), nosuid=nosuid, nodev=nodev)
            if refusal is not None or not (nosuid or nodev):
                assert index is None
                continue
            assert index is not None
            expected = index_volume_packed(str(top), hierarchies)
            assert list(index) == list(expected)
            for hierarchy, packed in expected.items():
                assert layout(index[hierarchy]) == layout(packed)


ENTRIES = st.lists(
    st.tuples(st.lists(NAMES, min_size=1, max_size=4), st.sampled_from(KINDS)), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(ENTRIES)
def test_the_same_refusal_and_the_same_index_as_two_walks(
    entries: list[tuple[list[str], str]],
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        top = Path(scratch) / "vol"
        top.mkdir()
        make(top, entries)
        check(top, HIERARCHIES)


def test_a_tree_with_every_kind(tmp_path: Path) -> None:
    top = tmp_path / "vol"
    top.mkdir()
    make(top, [(["usr", "lib", "o", "f"], "file"), (["usr", "bin", "p"], "fifo")])
    make(top, [(["etc", "link"], "symlink"), (["opt", "x"], "file")])
    refusal, index = scan_and_index(str(top), HIERARCHIES, nosuid=True, nodev=True)
    assert refusal is None and index is not None
    assert sorted(index["/usr"].items()) == [
        ("bin", "d"), ("bin/p", "p"), ("lib", "d"), ("lib/o", "d"), ("lib/o/f", "f"),
    ]  # fmt: skip
    check(top, HIERARCHIES)


def test_the_first_offender_is_named_as_scan_tree_names_it(tmp_path: Path) -> None:
    top = tmp_path / "vol"
    top.mkdir()
    make(top, [([d, "bin", f"su{i}"], "setuid") for d in ("usr", "etc", "opt") for i in range(5)])
    refusal, index = scan_and_index(str(top), HIERARCHIES, nosuid=True, nodev=False)
    assert refusal is not None and refusal == scan_tree(str(top), nosuid=True, nodev=False)
    assert index is None


def test_nested_hierarchies_are_left_to_the_indexer(tmp_path: Path) -> None:
    top = tmp_path / "vol"
    top.mkdir()
    make(top, [(["usr", "local", "f"], "file")])
    assert scan_and_index(str(top), ("/usr", "/usr/local"), nosuid=True, nodev=True) == (
        None,
        None,
    )


def test_a_hierarchy_that_is_not_a_directory_is_absent(tmp_path: Path) -> None:
    top = tmp_path / "vol"
    top.mkdir()
    make(top, [(["usr"], "file"), (["etc", "a"], "file")])
    refusal, index = scan_and_index(str(top), HIERARCHIES, nosuid=True, nodev=True)
    assert refusal is None and index is not None and list(index) == ["/etc"]


def indexed_volume(name: str) -> Volume:
    device = BlockDevice(f"/dev/loop{name}", (7, 9), {"ID_FS_TYPE": "squashfs"}, diskseq=9)
    return Volume(name, device, Manifest(name, {"ID": "_any"}))


def test_an_index_from_the_probe_serves_only_a_mount_with_the_probes_content_key(
    tmp_path: Path,
) -> None:
    top = tmp_path / "vol"
    make(top, [(["usr", "bin", "tool"], "file")])
    volume = indexed_volume("web")
    probed = {"/usr": index_volume_packed(str(top), HIERARCHIES)["/usr"]}
    make(top, [(["usr", "bin", "other"], "file")])  # what a mount with another key shows
    indexes = VolumeIndexes(Layout(Config()), HIERARCHIES)

    async def index(content: str) -> dict[str, PackedTree]:
        return await indexes.index(volume, str(top), content)

    indexes.seed(volume, probed, "key-1")
    assert asyncio.run(index("key-1")) is probed
    walked = asyncio.run(index("key-2"))  # another content: walked, not the probe's
    assert sorted(walked["/usr"].items()) == [
        ("bin", "d"), ("bin/other", "f"), ("bin/tool", "f"),
    ]  # fmt: skip
    assert asyncio.run(index("key-2")) is walked  # cached for that content from now on
