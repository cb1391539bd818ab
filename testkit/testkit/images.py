"""File trees and personality images: squashfs, erofs and ext4, built from a dict of files.

ext4 labels are at most 16 bytes (`personality-gameserver` would become `personality-game`);
bookworm's mkfs.erofs (erofs-utils 1.5) cannot set a label at all, squashfs has none.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testkit.processes import run

# File specs for `write_tree`/`build_image`: bytes or str is a regular file (mode 0755 when it
# starts with "#!", else 0644); tuples:
#   ("symlink", target)  ("dir",)  ("file", content, mode)  ("fifo",)  ("chardev", major, minor)
#   ("whiteout",): an overlay whiteout (char device 0:0)
#   ("opaque",): a directory marked opaque for overlayfs (trusted.overlay.opaque=y)
#   ("blockdev", major, minor)  ("socket",)  ("dir", mode)
FileSpec = bytes | str | tuple[Any, ...]

WHITEOUT: FileSpec = ("whiteout",)
OPAQUE: FileSpec = ("opaque",)


def _write_special(path: Path, rel: str, spec: tuple[Any, ...]) -> None:
    kind = spec[0]
    if kind == "symlink":
        path.symlink_to(spec[1])
    elif kind == "dir":
        path.mkdir(exist_ok=True)
        if len(spec) > 1:
            path.chmod(spec[1])
    elif kind == "file":
        content = spec[1].encode() if isinstance(spec[1], str) else spec[1]
        path.write_bytes(content)
        path.chmod(spec[2])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(spec[1], spec[2]))
    elif kind == "blockdev":
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(spec[1], spec[2]))
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "whiteout":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    elif kind == "opaque":
        path.mkdir(exist_ok=True)
        os.setxattr(path, "trusted.overlay.opaque", b"y")
    else:
        raise ValueError(f"{rel}: unknown file spec {spec!r}")


def write_tree(src: Path, files: Mapping[str, FileSpec]) -> None:
    """Create `files` (root-relative paths, leading '/' optional) under directory `src`."""
    for rel, spec in files.items():
        path = src / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str):
            spec = spec.encode()
        if isinstance(spec, bytes):
            path.write_bytes(spec)
            path.chmod(0o755 if spec.startswith(b"#!") else 0o644)
        else:
            _write_special(path, rel, spec)


def format_os_release(fields: Mapping[str, str]) -> str:
    """os-release syntax: KEY="value" lines, with shell-special characters escaped."""
    lines = []
    for key, value in fields.items():
        escaped = re.sub(r'([\\"$`])', r"\\\1", str(value))
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _tree_bytes(src: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (math.ceil(st.st_size / 4096) + 1) * 4096
    return total


def _erofs_supports_label() -> bool:
    proc = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True, check=False)
    return re.search(r"^\s*-L", proc.stdout + proc.stderr, re.MULTILINE) is not None


def pack_image(
    src: Path, image: Path, fmt: str, label: str | None = None, timeout: float = 900
) -> None:
    """Pack directory `src` into a new image file: files owned by root, as a volume ships.

    `squashfs` (`mksquashfs -all-root`), `erofs` (`mkfs.erofs --all-root`; bookworm's
    erofs-utils 1.5 has no `-L`, so a label fails there), `ext4` (`mkfs.ext4 -d`, sized from
    the tree, at least 4 MiB; labels of at most 16 bytes). A 100,000-file tree takes minutes on a
    loaded machine, hence the long `timeout`.
    """
    if fmt == "squashfs":
        run(
            "mksquashfs", src, image, "-noappend", "-quiet", "-no-progress", "-all-root",
            timeout=timeout,
        )  # fmt: skip
    elif fmt == "erofs":
        cmd = ["mkfs.erofs", "--quiet", "--all-root"]
        if label is not None:
            if not _erofs_supports_label():
                raise AssertionError("this mkfs.erofs has no -L: erofs images cannot be labelled")
            cmd += ["-L", label]
        run(*cmd, image, src, timeout=timeout)
    elif fmt == "ext4":
        if label is not None and len(label.encode()) > 16:
            raise AssertionError(f"ext4 labels have at most 16 bytes: {label!r}")
        size = max(4 << 20, 2 * _tree_bytes(src) + (2 << 20))
        with open(image, "wb") as f:
            f.truncate(size)
        cmd = ["mkfs.ext4", "-q", "-d", str(src)]
        if label is not None:
            cmd += ["-L", label]
        run(*cmd, image, timeout=timeout)
    else:
        raise ValueError(f"unknown image format {fmt!r}")


def build_image(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    fmt: str = "squashfs",
    manifest: Mapping[str, str] | None = None,
    label: str | None = None,
    *,
    with_manifest: bool = True,
    manifest_dir: str = "usr/lib/extension-release.d",
    xattrs: Mapping[str, Mapping[str, bytes]] | None = None,
    capabilities: Mapping[str, str] | None = None,
) -> Path:
    """Build a personality image `name` from `files`; return the image path.

    The tree gets `<manifest_dir>/extension-release.<name>` with `manifest` in os-release syntax
    (default `ID=_any`; none at all with `with_manifest=False`). Formats as `pack_image`.
    `xattrs` sets extended attributes (path -> name -> value, e.g. `trusted.overlay.opaque`),
    `capabilities` file capabilities in `setcap` syntax (path -> `cap_dac_read_search=ep`), on
    paths of `files`. Images go to `tmp_path/images/<name>.<fmt>` (`<name>-2.<fmt>` ... if taken).
    """
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    src = _unique(images / f"{name}.tree")
    src.mkdir()
    write_tree(src, files)
    for rel, attributes in (xattrs or {}).items():
        for key, value in attributes.items():
            os.setxattr(src / rel.lstrip("/"), key, value, follow_symlinks=False)
    for rel, caps in (capabilities or {}).items():
        run("setcap", caps, src / rel.lstrip("/"))
    if with_manifest:
        release = src / manifest_dir / f"extension-release.{name}"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text(format_os_release(manifest if manifest is not None else {"ID": "_any"}))
    image = _unique(images / f"{name}.{fmt}")
    pack_image(src, image, fmt, label)
    return image


def build_writable_image(
    tmp_path: Path, label: str = "personality-data", size_mb: int = 32, fs_type: str = "ext4"
) -> Path:
    """An empty image labelled `label` for the writable volume (ext4, or btrfs: then at
    least 128 MiB, sparse)."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    image = _unique(images / f"{label}.{fs_type}")
    with open(image, "wb") as f:
        f.truncate((max(size_mb, 128) if fs_type == "btrfs" else size_mb) << 20)
    if fs_type == "btrfs":
        run("mkfs.btrfs", "-q", "-L", label, image)
    else:
        run("mkfs.ext4", "-q", "-L", label, image)
    return image


def rewrite_in_place(image: Path, new_image: Path) -> None:
    """Overwrite `image` with `new_image`'s bytes (zeros after them), keeping its inode and
    size: a loop device on it keeps its identity, DISKSEQ and capacity, while its content
    changes, as an image rewritten in place by whoever can write the file."""
    data = new_image.read_bytes()
    size = image.stat().st_size
    assert len(data) <= size, "the new image must fit in the old one's size"
    with open(image, "r+b") as f:
        f.write(data)
        f.write(bytes(size - len(data)))
        f.flush()
        os.fsync(f.fileno())
