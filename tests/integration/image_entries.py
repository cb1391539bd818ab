"""Image files and directory trees in search paths, as the tests of test_image_*.py make them:
a search directory under the sandbox root, entries put there the way an administrator does
(written beside, then renamed in), and the loop devices that back them (`losetup --json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from testkit.processes import run
from testkit.sysext import install_sysext

SEARCH_DIR = "/var/lib/personalities"  # one of the default images.search_paths
RUN_DIR = "/run/personalities"  # another, before SEARCH_DIR in precedence


def search_dir(root: Path, rel: str = SEARCH_DIR) -> Path:
    """The search directory `rel` under `root`, made as tmpfiles.d would (root, 0755)."""
    directory = root / rel.lstrip("/")
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    return directory


def install(image: Path, directory: Path, name: str) -> Path:
    """Copy `image` to `directory/name` as root 0644: written under a dot name, then renamed in
    (so the daemon never sees half a file)."""
    return install_sysext(image, directory, name)


def mkdirs(path: Path, mode: int = 0o755) -> Path:
    """`path` and its missing parents, `path` with `mode`."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def write(path: Path, content: bytes = b"image", mode: int = 0o644) -> Path:
    """A file of `content` with `mode` (its directory made 0755 if missing)."""
    if not path.parent.is_dir():
        mkdirs(path.parent)
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def losetup_rows() -> list[dict[str, Any]]:
    out = run("losetup", "--json", "--list").strip()
    rows: list[dict[str, Any]] = json.loads(out)["loopdevices"] if out else []
    return rows


def loops_backed_under(directory: Path) -> list[dict[str, Any]]:
    """`losetup --json` rows whose backing file is under `directory` (this test's files: the
    machine is shared, so the whole list is never compared)."""
    prefix = str(directory) + "/"
    return [r for r in losetup_rows() if str(r.get("back-file") or "").startswith(prefix)]


def is_flag(value: object) -> bool:
    """losetup --json spells flags as booleans or as "0"/"1" depending on its version."""
    return value in (True, 1, "1")
