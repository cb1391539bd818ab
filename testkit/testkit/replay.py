"""Personality images whose journal or log needs replay: ext4, xfs and btrfs, as a crash leaves
them, and an ext4 whose superblock lists an orphan inode. Mounting one of them without the
right options, or on a writable device, writes to it; `sha256` shows whether it was written.

Each image holds a personality tree (with its manifest) written and cleanly unmounted first,
so it reads back without replay, then a pending write that only a replay would apply:

- ext4 and xfs: mounted read-write again, a file written and fsynced, then
  `xfs_io -x -c "shutdown -f"` (the log is flushed, the filesystem never marked clean);
- btrfs: mounted read-write again, a file written and fsynced (btrfs logs an fsync in its log
  tree), and the image file copied while still mounted: the copy has a nonzero `log_root`.

`needs_replay(image, fmt)` checks that state from outside: `dumpe2fs -h` shows
`needs_recovery`, `xfs_logprint -t` a `<DIRTY>` log, `btrfs inspect-internal dump-super` a
nonzero `log_root`.

Building mounts on a loop device of its own, under a mount point in `tmp_path`: call it in
the tests' private mount namespace (tests/conftest.py) before a daemon is started.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from testkit.images import FileSpec, format_os_release, write_tree
from testkit.loops import clear_read_only, loop_backing_file
from testkit.processes import run

REPLAY_FORMATS = ("ext4", "xfs", "btrfs")
# Smallest sizes the tools accept (xfsprogs 6.1 refuses filesystems under 300 MiB); sparse.
_SIZES_MB = {"ext4": 32, "xfs": 300, "btrfs": 128}
PENDING_FILE = "pending-write"  # at the filesystem's top, outside usr/ and etc/


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mkfs(image: Path, fmt: str, label: str | None) -> None:
    with open(image, "wb") as f:
        f.truncate(_SIZES_MB[fmt] << 20)
    label_args = ["-L", label] if label else []
    if fmt == "ext4":
        run("mkfs.ext4", "-q", *label_args, image)
    elif fmt == "xfs":
        run("mkfs.xfs", "-q", *label_args, image)
    elif fmt == "btrfs":
        run("mkfs.btrfs", "-q", *label_args, image)
    else:
        raise ValueError(f"no replay image for {fmt!r}; one of {REPLAY_FORMATS}")


@contextlib.contextmanager
def _mounted_rw(image: Path, mount_point: Path) -> Iterator[Path]:
    """`image` on a loop device of its own, mounted read-write at `mount_point`."""
    dev = run("losetup", "--find", "--show", image).strip()
    try:
        run("blockdev", "--setrw", dev)  # a flag left by an earlier user of the loop number
        mount_point.mkdir(parents=True, exist_ok=True)
        run("mount", dev, mount_point)
        try:
            yield mount_point
        finally:
            run("umount", mount_point)
    finally:
        if loop_backing_file(dev) == str(image.resolve()):
            clear_read_only(dev)
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _write_pending(mount_point: Path) -> None:
    path = mount_point / PENDING_FILE
    path.write_bytes(b"only a replay writes this\n" * 64)
    run("xfs_io", "-c", "fsync", path)


def build_replay_image(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    fmt: str,
    *,
    manifest: Mapping[str, str] | None = None,
    label: str | None = None,
) -> Path:
    """A personality image `name` (`fmt` ext4, xfs or btrfs) whose journal or log needs
    replay; in `tmp_path/images/`. The tree gets `usr/lib/extension-release.d/
    extension-release.<name>` (`manifest`, default `ID=_any`), as `build_image` does."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    src = images / f"{name}.replay-tree"
    src.mkdir()
    write_tree(src, files)
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text(format_os_release(manifest if manifest is not None else {"ID": "_any"}))
    image = images / f"{name}.{fmt}"
    _mkfs(image, fmt, label)
    mount_point = images / f"{name}.replay-mnt"
    with _mounted_rw(image, mount_point) as mnt:
        run("cp", "-a", f"{src}/.", mnt)
    result = image
    with _mounted_rw(image, mount_point) as mnt:
        _write_pending(mnt)
        if fmt == "btrfs":
            result = images / f"{name}.crashed.{fmt}"
            run("cp", "--sparse=always", image, result)
        else:
            run("xfs_io", "-x", "-c", "shutdown -f", mnt)
    if result != image:
        image.unlink()
        result = result.rename(image)
    shutil.rmtree(src)
    mount_point.rmdir()
    if not needs_replay(result, fmt):
        raise AssertionError(f"{result}: built to need a replay, but it does not")
    return result


def needs_replay(image: Path, fmt: str) -> bool:
    """Whether the journal (ext4) or log (xfs, btrfs) of the filesystem in `image` has
    changes that a read-write mount would replay, as the filesystem's own tools report it."""
    if fmt == "ext4":
        out = run("dumpe2fs", "-h", image)
        features = re.search(r"^Filesystem features:(.*)$", out, re.MULTILINE)
        return features is not None and "needs_recovery" in features.group(1).split()
    if fmt == "xfs":
        return "<DIRTY>" in run("xfs_logprint", "-t", image)
    if fmt == "btrfs":
        out = run("btrfs", "inspect-internal", "dump-super", image)
        log_root = re.search(r"^log_root\s+(\d+)$", out, re.MULTILINE)
        return log_root is not None and int(log_root.group(1)) != 0
    raise ValueError(f"no replay check for {fmt!r}")


def add_orphan(image: Path, rel: str) -> None:
    """Make the superblock of the ext4 `image` list the inode of `rel` as an orphan (`debugfs
    -w`): any mount that may write, even `ro,norecovery`, truncates it and so writes the
    image; on a device the kernel holds read-only, ext4 skips the cleanup."""
    out = run("debugfs", "-R", f"stat /{rel.lstrip('/')}", image)
    found = re.search(r"Inode:\s*(\d+)", out)
    if found is None:
        raise AssertionError(f"debugfs found no inode for {rel} in {image}: {out}")
    run("debugfs", "-w", "-R", f"ssv last_orphan {found.group(1)}", image)
    recorded = re.search(r"^First orphan inode:\s*(\d+)$", run("dumpe2fs", "-h", image), re.M)
    if recorded is None or recorded.group(1) != found.group(1):
        raise AssertionError(f"{image}: debugfs did not record the orphan inode")
