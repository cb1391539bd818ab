"""`mounts.open_path` gives the same answers with openat2 and, where a seccomp filter refuses
openat2 (ENOSYS, as in containers), when it walks one component at a time."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from personalityd.adapters import mounts

Opener = Callable[..., int]


def by_components(path: str, dirfd: int = mounts.AT_FDCWD, *, beneath: bool = False,
                  xdev: bool = True) -> int:  # fmt: skip
    return mounts._open_path_by_components(path, dirfd, beneath=beneath, xdev=xdev)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/file").write_text("x")
    (tmp_path / "link").symlink_to("a")
    (tmp_path / "a/up").symlink_to("/etc")
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "mnt")], check=True)
    (tmp_path / "mnt/inside").mkdir()
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def outcome(opener: Opener, path: str, dirfd: int = mounts.AT_FDCWD, **flags: bool) -> object:
    try:
        fd = opener(path, dirfd, **flags)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("path", "flags"),
    [
        ("a/b/file", {}),
        ("link/b", {}),
        ("a/up", {}),
        ("mnt/inside", {}),
        ("mnt/inside", {"xdev": False}),
        ("a/b/../b/file", {}),
        ("../x", {"beneath": True}),
        ("a/b/file", {"beneath": True}),
        ("missing/x", {}),
    ],
)
def test_both_ways_agree(tree: Path, path: str, flags: dict[str, bool]) -> None:
    dirfd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        assert outcome(by_components, path, dirfd, **flags) == outcome(
            mounts.open_path, path, dirfd, **flags
        )
    finally:
        os.close(dirfd)


def test_absolute_paths_both_ways(tree: Path) -> None:
    assert outcome(by_components, str(tree / "a/b/file")) == outcome(
        mounts.open_path, str(tree / "a/b/file")
    )
    assert outcome(by_components, str(tree / "link/b")) == "ELOOP"
