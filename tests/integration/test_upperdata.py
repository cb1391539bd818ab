"""stack.upperdata and adapters.btrfs on a real btrfs volume (a loop device over a file made
with mkfs.btrfs, mounted in the session's private mount namespace), with overlays whose
upperdir and workdir are in the live subvolume, as the engine mounts them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from personalityd.adapters import btrfs
from personalityd.stack.upperdata import UpperData
from testkit.images import build_writable_image
from testkit.loops import LoopDevices
from testkit.mounts import is_mount_point, unmount_tree
from testkit.processes import run

KEY = "_usr"


def _mount_image(image: Path, target: Path, loop_devices: LoopDevices) -> Path:
    dev = loop_devices.attach(image, read_only=False)
    target.mkdir(parents=True)
    run("mount", dev, target)
    return target


@pytest.fixture
def volume(tmp_path: Path, loop_devices: LoopDevices) -> Iterator[Path]:
    """A fresh btrfs volume mounted at tmp_path/mnt/writable (unmounted before the loop
    device is detached)."""
    image = tmp_path / "writable.btrfs"
    with open(image, "wb") as f:
        f.truncate(160 << 20)
    run("mkfs.btrfs", "-q", "-f", "-L", "writable", image)
    try:
        yield _mount_image(image, tmp_path / "mnt/writable", loop_devices)
    finally:
        unmount_tree(tmp_path / "mnt")


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """A lower layer: share/a.txt ("lower"), share/gone.txt."""
    share = tmp_path / "lower/share"
    share.mkdir(parents=True)
    (share / "a.txt").write_text("lower\n")
    (share / "gone.txt").write_text("to be deleted\n")
    return tmp_path / "lower"


@contextmanager
def overlay(lower: Path, live: str, target: Path, generation: int) -> Iterator[Path]:
    """The overlay the engine would mount over `lower` with its upper in the live subvolume
    (upper/<key>, work/<key>/<generation>); lazily unmounted after, if still mounted."""
    upper = Path(live, "upper", KEY)
    work = Path(live, "work", KEY, str(generation))
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True)
    target.mkdir(parents=True, exist_ok=True)
    run(
        "mount", "-t", "overlay", "overlay",
        "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", target,
    )  # fmt: skip
    try:
        yield target
    finally:
        if is_mount_point(target):
            run("umount", "--lazy", target)


def test_live_subvolume_holds_an_overlay_upper_and_copy_up_works(
    volume: Path, lower: Path, tmp_path: Path
) -> None:
    data = UpperData.open(str(volume))
    assert data is not None
    name, live = data.live_root(None)
    assert (name, live) == ("0", str(volume / "live/0"))
    assert btrfs.is_subvolume(live)
    assert not btrfs.is_read_only(live)
    assert data.live_root(None) == (name, live)  # the single live one is reused
    assert data.live_root("0") == (name, live)
    for kind in ("live", "snapshots", "rolled-back"):
        data._dir(kind)
        assert (volume / kind).stat().st_mode & 0o777 == 0o700

    with overlay(lower, live, tmp_path / "view", 1) as view:
        with open(view / "share/a.txt", "a") as f:  # copy-up: a rename from work to upper
            f.write("written\n")
        (view / "share/new.txt").write_text("new\n")
        assert (view / "share/a.txt").read_text() == "lower\nwritten\n"
    assert Path(live, "upper", KEY, "share/a.txt").read_text() == "lower\nwritten\n"
    assert (lower / "share/a.txt").read_text() == "lower\n"


def test_keep_write_restore_gives_the_old_content(
    volume: Path, lower: Path, tmp_path: Path
) -> None:
    data = UpperData.open(str(volume))
    assert data is not None
    name, live = data.live_root(None)
    with overlay(lower, live, tmp_path / "view", 1) as view:
        with open(view / "share/a.txt", "a") as f:
            f.write("generation 1\n")
        data.keep(1, name)  # generation 1 is left, its overlay still mounted
        assert data.has(1) and not data.has(2)
        assert data.generations() == [1]
        with open(view / "share/a.txt", "a") as f:
            f.write("generation 2\n")
        (view / "share/new.txt").write_text("new in 2\n")
        (view / "share/gone.txt").unlink()  # a whiteout in the upper

        new_name, restored = data.restore(1, 3)
        rolled_back = data.keep_rolled_back(2, name)

    assert (new_name, restored) == ("3", str(volume / "live/3"))
    assert btrfs.is_subvolume(restored) and not btrfs.is_read_only(restored)
    # The restored upper, under an overlay of the next generation, shows generation 1.
    with overlay(lower, restored, tmp_path / "view3", 3) as view:
        assert (view / "share/a.txt").read_text() == "lower\ngeneration 1\n"
        assert not (view / "share/new.txt").exists()
        assert (view / "share/gone.txt").read_text() == "to be deleted\n"
        (view / "share/after.txt").write_text("after the rollback\n")  # writable, copy-up too
        with open(view / "share/gone.txt", "a") as f:
            f.write("kept\n")

    # The rolled-back snapshot holds the newer writes and is read-only.
    assert rolled_back == str(volume / "rolled-back/2")
    upper = Path(rolled_back, "upper", KEY)
    assert (upper / "share/a.txt").read_text() == "lower\ngeneration 1\ngeneration 2\n"
    assert (upper / "share/new.txt").read_text() == "new in 2\n"
    assert btrfs.is_read_only(rolled_back)
    with pytest.raises(OSError) as exc:
        (upper / "share/x").write_text("x")
    assert exc.value.errno == errno.EROFS
    # A second rollback from the same generation keeps both.
    assert data.keep_rolled_back(2, new_name) == str(volume / "rolled-back/2.1")
    assert (upper / "share/a.txt").read_text().endswith("generation 2\n")

    # The kept snapshot itself is read-only and unchanged by the restore's writes.
    snap = data.snapshot_path(1)
    assert btrfs.is_read_only(snap)
    assert not Path(snap, "upper", KEY, "share/after.txt").exists()
    with pytest.raises(OSError) as exc:
        Path(snap, "x").write_text("x")
    assert exc.value.errno == errno.EROFS


def test_keep_replaces_and_restore_never_reuses_a_name(volume: Path) -> None:
    data = UpperData.open(str(volume))
    assert data is not None
    name, live = data.live_root(None)
    Path(live, "f").write_text("first\n")
    data.keep(4, name)
    Path(live, "f").write_text("second\n")
    assert data.keep(4, name) == str(volume / "snapshots/4")
    assert Path(volume, "snapshots/4/f").read_text() == "second\n"
    assert sorted(os.listdir(volume / "snapshots")) == ["4"]  # no temporary left

    assert data.restore(4, 0)[0] == "0.1"  # live/0 is taken (the current one)
    assert data.restore(4, 5)[0] == "5"
    assert data.restore(4, 5)[0] == "5.1"
    with pytest.raises(LookupError):
        data.restore(3, 6)
    assert not (volume / "live/6").exists()

    data.discard("5.1")
    assert sorted(os.listdir(volume / "live")) == ["0", "0.1", "5"]
    with pytest.raises(ValueError):
        data.discard("../snapshots/4")
    # With no name given, the newest live subvolume is chosen.
    assert data.live_root(None)[0] == "5"


def test_prune_deletes_only_what_it_should(volume: Path) -> None:
    data = UpperData.open(str(volume))
    assert data is not None
    name, live = data.live_root(None)
    for g in range(1, 6):
        Path(live, "g").write_text(f"{g}\n")
        data.keep(g, name)
    current, _ = data.restore(4, 6)
    stale, _ = data.restore(4, 6)  # a restore that a crash left, never swapped in
    rolled_back = data.keep_rolled_back(5, name)
    # A temporary a crash left, and entries that are not ours.
    btrfs.snapshot(live, str(volume / "snapshots"), ".new-9", readonly=True)
    (volume / "snapshots/notes").mkdir()
    (volume / "snapshots/7").mkdir()  # our kind of name, but a plain directory
    btrfs.create_subvolume(str(volume / "live"), "foreign")

    pruned = data.prune({4, 5}, current)

    assert pruned.left == []
    assert sorted(pruned.deleted) == sorted(
        str(volume / p)
        for p in ("snapshots/1", "snapshots/2", "snapshots/3", "snapshots/.new-9", "live/0",
                  f"live/{stale}")
    )  # fmt: skip
    assert sorted(os.listdir(volume / "snapshots")) == ["4", "5", "7", "notes"]
    assert sorted(os.listdir(volume / "live")) == [current, "foreign"]
    assert os.listdir(volume / "rolled-back") == ["5"]
    assert Path(rolled_back, "g").read_text() == "5\n"
    assert data.generations() == [4, 5]
    assert data.prune({4, 5}, current).deleted == []


def test_prune_deletes_an_old_live_subvolume_still_in_use(
    volume: Path, lower: Path, tmp_path: Path
) -> None:
    """The old live subvolume is the upperdir of an overlay that was lazily detached, with a
    file of it still open: it is deleted, and the open file keeps working."""
    data = UpperData.open(str(volume))
    assert data is not None
    old, live = data.live_root(None)
    with overlay(lower, live, tmp_path / "view", 1) as view:
        (view / "share/a.txt").write_text("generation 1\n")
        data.keep(1, old)
        held = open(view / "share/a.txt", "r+")  # noqa: SIM115
    try:
        assert not is_mount_point(tmp_path / "view")  # lazily detached, still in use
        new, restored = data.restore(1, 2)
        with overlay(lower, restored, tmp_path / "view2", 2) as view2:
            pruned = data.prune({1}, new)
            assert pruned.deleted == [live] and pruned.left == []
            assert not os.path.lexists(live)
            assert (view2 / "share/a.txt").read_text() == "generation 1\n"
            assert held.read() == "generation 1\n"
            held.write("still writable\n")
            held.flush()
            os.fsync(held.fileno())
    finally:
        held.close()
    assert os.listdir(volume / "live") == [new]


def test_ext4_volume_is_not_supported(tmp_path: Path, loop_devices: LoopDevices) -> None:
    image = build_writable_image(tmp_path)
    try:
        mounted = _mount_image(image, tmp_path / "mnt/ext4", loop_devices)
        assert not btrfs.is_btrfs(str(mounted))
        assert UpperData.open(str(mounted)) is None
        assert os.listdir(mounted) == ["lost+found"]  # nothing made
    finally:
        unmount_tree(tmp_path / "mnt")


def test_legacy_layout_is_not_supported(volume: Path) -> None:
    """An upper at the volume's root (as before subvolumes) would be left behind."""
    (volume / "upper" / KEY).mkdir(parents=True)
    (volume / "work").mkdir()
    assert btrfs.is_btrfs(str(volume))
    assert UpperData.open(str(volume)) is None
    assert sorted(os.listdir(volume)) == ["upper", "work"]


def test_live_root_refuses_a_directory_in_place_of_a_subvolume(volume: Path) -> None:
    data = UpperData.open(str(volume))
    assert data is not None
    (volume / "live/3").mkdir(parents=True)
    with pytest.raises(OSError, match="live/3 exists and is not a btrfs subvolume"):
        data.live_root("3")
    with pytest.raises(ValueError):
        data.live_root("x")


def test_btrfs_adapter_refusals(volume: Path) -> None:
    parent = str(volume)
    for bad in ("", ".", "..", "a/b", "x" * 256):
        with pytest.raises(OSError, match="single path component") as exc:
            btrfs.create_subvolume(parent, bad)
        assert exc.value.errno == errno.EINVAL
    (volume / "dir").mkdir()
    with pytest.raises(OSError, match=f"{volume}/dir is not a btrfs subvolume"):
        btrfs.delete_subvolume(parent, "dir")
    with pytest.raises(OSError, match="is not a btrfs subvolume"):
        btrfs.snapshot(str(volume / "dir"), parent, "snap", readonly=True)
    with pytest.raises(OSError, match=f"cannot open directory {volume}/missing"):
        btrfs.create_subvolume(str(volume / "missing"), "x")
    os.symlink(volume / "dir", volume / "link")
    with pytest.raises(OSError, match=f"cannot open directory {volume}/link"):
        btrfs.create_subvolume(str(volume / "link"), "x")
    assert not btrfs.is_subvolume(str(volume / "link"))
    assert not btrfs.is_subvolume(str(volume / "missing"))
    btrfs.create_subvolume(parent, "sub")
    with pytest.raises(OSError, match=f"cannot create subvolume {volume}/sub") as exc:
        btrfs.create_subvolume(parent, "sub")
    assert exc.value.errno == errno.EEXIST
    # A read-only snapshot holding a nested subvolume cannot go: named in the error.
    btrfs.create_subvolume(str(volume / "sub"), "nested")
    btrfs.snapshot(str(volume / "sub"), parent, "ro", readonly=True)
    btrfs.delete_subvolume(parent, "ro")  # the snapshot has an empty stub, not the nested one
    with pytest.raises(OSError, match=f"cannot delete subvolume {volume}/sub"):
        btrfs.delete_subvolume(parent, "sub")
    btrfs.delete_subvolume(str(volume / "sub"), "nested")
    btrfs.delete_subvolume(parent, "sub")
    assert sorted(os.listdir(volume)) == ["dir", "link"]
