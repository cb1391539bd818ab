"""The volume indexer on real trees in tmp_path: kinds, overlay xattrs, errors, comparisons."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from oracles import index_tree, index_volume

from personalityd.adapters import indexer
from personalityd.adapters.indexer import identical_entries
from personalityd.core.model import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    OPAQUE_DIR,
    SOCKET,
    SYMLINK,
    WHITEOUT,
)

KINDS = (DIR, OPAQUE_DIR, FILE, SYMLINK, WHITEOUT, CHAR_DEVICE, BLOCK_DEVICE, FIFO, SOCKET)


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A volume tree with every kind of entry under usr/, and an etc/ that is a symlink."""
    vol = tmp_path / "vol"
    usr = vol / "usr"
    write(usr / "bin" / "tool", b"#!/bin/sh\n")
    os.symlink("tool", usr / "bin" / "tool-link")
    os.symlink("/nonexistent", usr / "bin" / "dangling")
    (usr / "lib" / "empty").mkdir(parents=True)
    os.mkfifo(usr / "lib" / "fifo")
    os.mknod(usr / "lib" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(usr / "lib" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(usr / "lib" / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(usr / "lib" / "sock"))
    sock.close()
    write(usr / "share" / "opaque" / "inside")
    os.setxattr(usr / "share" / "opaque", "trusted.overlay.opaque", b"y")
    write(usr / "share" / "user-opaque" / "inside")
    os.setxattr(usr / "share" / "user-opaque", "user.overlay.opaque", b"y")
    (usr / "share" / "not-opaque").mkdir()
    os.setxattr(usr / "share" / "not-opaque", "trusted.overlay.opaque", b"n")
    # A directory marked for xattr whiteouts (overlay.opaque=x) merges, and holds some.
    xdir = usr / "share" / "xwhiteouts"
    write(xdir / "removed", b"")
    os.setxattr(xdir / "removed", "trusted.overlay.whiteout", b"")
    write(xdir / "user-removed", b"")
    os.setxattr(xdir / "user-removed", "user.overlay.whiteout", b"")
    write(xdir / "not-empty", b"data")
    os.setxattr(xdir / "not-empty", "trusted.overlay.whiteout", b"")
    write(xdir / "plain-empty", b"")
    os.setxattr(xdir, "trusted.overlay.opaque", b"x")
    # The same xattr whiteout outside a marked directory is an empty file to the kernel.
    write(usr / "share" / "unmarked-removed", b"")
    os.setxattr(usr / "share" / "unmarked-removed", "trusted.overlay.whiteout", b"")
    write(vol / "real-etc" / "os-release")
    os.symlink("real-etc", vol / "etc")
    write(vol / "opt" / "file-not-dir")
    yield vol


def test_index_every_kind(volume: Path) -> None:
    result = index_volume(str(volume), ["/usr", "/etc", "/var", "/opt/file-not-dir"])
    assert list(result) == ["/usr"]
    assert result["/usr"] == {
        "bin": DIR,
        "bin/tool": FILE,
        "bin/tool-link": SYMLINK,
        "bin/dangling": SYMLINK,
        "lib": DIR,
        "lib/empty": DIR,
        "lib/fifo": FIFO,
        "lib/gone": WHITEOUT,
        "lib/null": CHAR_DEVICE,
        "lib/loop": BLOCK_DEVICE,
        "lib/sock": SOCKET,
        "share": DIR,
        "share/opaque": OPAQUE_DIR,
        "share/opaque/inside": FILE,
        "share/user-opaque": DIR,  # user.overlay.* is data: the overlays are not userxattr
        "share/user-opaque/inside": FILE,
        "share/not-opaque": DIR,
        "share/xwhiteouts": DIR,
        "share/xwhiteouts/removed": WHITEOUT,
        "share/xwhiteouts/user-removed": FILE,
        "share/xwhiteouts/not-empty": FILE,
        "share/xwhiteouts/plain-empty": FILE,
        "share/unmarked-removed": FILE,
    }


def test_kind_strings_are_shared_objects(volume: Path) -> None:
    index = index_volume(str(volume), ["/usr"])["/usr"]
    assert all(any(kind is k for k in KINDS) for kind in index.values())


def test_nested_hierarchy_and_symlinked_component(tmp_path: Path) -> None:
    write(tmp_path / "usr" / "local" / "bin" / "x")
    write(tmp_path / "elsewhere" / "lib" / "y")
    os.symlink("../elsewhere", tmp_path / "usr" / "linked")
    result = index_volume(str(tmp_path), ["/usr/local", "/usr/linked/lib"])
    assert result == {"/usr/local": {"bin": DIR, "bin/x": FILE}}


def test_empty_hierarchy_is_present_and_empty(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    assert index_volume(str(tmp_path), ["/etc"]) == {"/etc": {}}


def test_deep_tree_needs_no_recursion(tmp_path: Path) -> None:
    depth = 1100  # beyond Python's default recursion limit
    relpath = "/".join(["d"] * depth)
    path = tmp_path / "usr"
    path.mkdir()
    try:
        for _ in range(depth):  # not os.makedirs: that one recurses
            path = path / "d"
            path.mkdir()
        write(path / "leaf")
        index = index_volume(str(tmp_path), ["/usr"])["/usr"]
        assert len(index) == depth + 1
        assert index[relpath + "/leaf"] == FILE
    finally:  # shutil.rmtree (pytest's cleanup) recurses too
        subprocess.run(["rm", "-rf", "--", str(tmp_path / "usr")], check=True)


def test_symlinked_directories_are_not_followed(tmp_path: Path) -> None:
    write(tmp_path / "outside" / "secret")
    (tmp_path / "usr").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "usr" / "out")
    os.symlink(".", tmp_path / "usr" / "loop")
    assert index_volume(str(tmp_path), ["/usr"])["/usr"] == {"out": SYMLINK, "loop": SYMLINK}


def test_io_error_names_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "usr" / "lib" / "broken" / "x")
    broken = str(tmp_path / "usr" / "lib" / "broken")
    real_scandir = os.scandir

    def failing_scandir(path: str) -> object:
        if path == broken:
            raise OSError(errno.EIO, "Input/output error", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    with pytest.raises(OSError) as info:
        index_volume(str(tmp_path), ["/usr"])
    assert info.value.errno == errno.EIO
    assert info.value.filename == broken


def test_io_error_on_hierarchy_lookup_propagates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_lstat(path: str) -> os.stat_result:
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(os, "lstat", failing_lstat)
    with pytest.raises(OSError) as info:
        index_volume(str(tmp_path), ["/usr"])
    assert info.value.filename == os.path.join(str(tmp_path), "usr")


def test_index_tree_of_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        index_tree(str(tmp_path / "gone"))
    assert info.value.filename == str(tmp_path / "gone")


# identical_entries


def test_identical_regular_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"same content")
    b = write(tmp_path / "b", b"same content")
    c = write(tmp_path / "c", b"same content")
    assert identical_entries([str(a), str(b), str(c)])


def test_same_size_different_content(tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"content-1")
    b = write(tmp_path / "b", b"content-2")
    assert not identical_entries([str(a), str(b)])


def test_different_sizes(tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"short")
    b = write(tmp_path / "b", b"longer")
    assert not identical_entries([str(a), str(b)])


def test_large_files_differing_after_first_chunk(tmp_path: Path) -> None:
    chunk = indexer.COMPARE_CHUNK
    body = os.urandom(chunk) + b"x" * (chunk // 2)
    a = write(tmp_path / "a", body + b"A")
    b = write(tmp_path / "b", body + b"B")
    c = write(tmp_path / "c", body + b"A")
    assert not identical_entries([str(a), str(b)])
    assert identical_entries([str(a), str(c)])


def test_exact_chunk_multiple(tmp_path: Path) -> None:
    body = b"z" * (2 * indexer.COMPARE_CHUNK)
    a = write(tmp_path / "a", body)
    b = write(tmp_path / "b", body)
    assert identical_entries([str(a), str(b)])


def test_empty_files_and_same_file_twice(tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"")
    b = write(tmp_path / "b", b"")
    assert identical_entries([str(a), str(b)])
    assert identical_entries([str(a), str(a)])


def test_symlinks(tmp_path: Path) -> None:
    for name, target in (("l1", "target"), ("l2", "target"), ("l3", "other")):
        os.symlink(target, tmp_path / name)
    assert identical_entries([str(tmp_path / "l1"), str(tmp_path / "l2")])
    assert not identical_entries([str(tmp_path / "l1"), str(tmp_path / "l3")])


def test_mixed_kinds_and_errors(tmp_path: Path) -> None:
    a = write(tmp_path / "target", b"target")
    os.symlink("target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    assert not identical_entries([str(a), str(tmp_path / "link")])
    assert not identical_entries([str(tmp_path / "link"), str(a)])
    assert not identical_entries([str(a), str(tmp_path / "missing")])
    assert not identical_entries([str(tmp_path / "missing"), str(a)])
    assert not identical_entries([str(tmp_path / "fifo"), str(tmp_path / "fifo")])
    assert not identical_entries([str(tmp_path / "dir"), str(tmp_path / "dir")])
    assert not identical_entries([])
