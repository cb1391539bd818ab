"""Shared pieces of the benchmark: the private mount namespace, the data set, statistics.

The data set is built here, from nothing: trees of small files written under
`bench/data/trees/`, packed into squashfs and erofs images under `bench/data/images/`
(git-ignored), and kept between runs (an image is rebuilt when its recipe changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
IMAGES = DATA / "images"
TREES = DATA / "trees"

NAMESPACE_ENV = "PERSONALITYD_BENCH_NS"


def ensure_private_namespace() -> None:
    """Re-exec this process under `unshare -m --propagation private` once (root only)."""
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (loop devices, mounts, udev)")
    if os.environ.get(NAMESPACE_ENV) == "1":
        return
    os.environ[NAMESPACE_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.argv]
    os.execvp("unshare", ["unshare", "-m", "--propagation", "private", "--", *argv])


def quick() -> bool:
    return os.environ.get("BENCH_QUICK") == "1"


# --------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Recipe:
    """One personality image: `files` regular files spread over directories of 100."""

    name: str
    files: int
    fmt: str = "squashfs"
    conflicts: int = 0  # usr/share/common/cNN, different content in every image
    shared: bool = False  # usr/lib/bench/shared.txt, the same bytes in every image
    etc: bool = False  # a few files under etc/ (so /etc is stacked too)
    deep: bool = False  # 100,000-file layout: two directory levels

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def image(self) -> Path:
        return IMAGES / f"{self.name}.{self.fmt}"


def _write_tree(recipe: Recipe, src: Path) -> None:
    if src.exists():
        shutil.rmtree(src)
    top = src / "usr" / "share" / f"bench-{recipe.name}"
    per_dir = 100
    for i in range(recipe.files):
        if recipe.deep:
            d = top / f"g{i // 10000:02d}" / f"d{(i // per_dir) % 100:02d}"
        else:
            d = top / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(f"{recipe.name} {i}\n".encode())
    if recipe.conflicts:
        common = src / "usr" / "share" / "common"
        common.mkdir(parents=True, exist_ok=True)
        for i in range(recipe.conflicts):
            (common / f"c{i:03d}").write_bytes(f"{recipe.name} version of c{i}\n".encode())
    if recipe.shared:
        shared = src / "usr" / "lib" / "bench"
        shared.mkdir(parents=True, exist_ok=True)
        (shared / "shared.txt").write_bytes(b"the same shared bytes in every bench image\n" * 8)
    if recipe.etc:
        etc = src / "etc" / "bench"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / f"{recipe.name}.conf").write_text(f"name = {recipe.name}\n")
        (etc / "common.conf").write_text(f"owner = {recipe.name}\n")
    release = src / "usr" / "lib" / "extension-release.d" / f"extension-release.{recipe.name}"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text(f'ID=_any\nIMAGE_VERSION="{recipe.key()}"\n')


def build(recipe: Recipe) -> Path:
    """The image for `recipe`, built unless an image of the same recipe is there."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    stamp = recipe.image.with_suffix(recipe.image.suffix + ".recipe")
    if recipe.image.exists() and stamp.exists() and stamp.read_text() == recipe.key():
        return recipe.image
    src = TREES / recipe.name
    _write_tree(recipe, src)
    recipe.image.unlink(missing_ok=True)
    if recipe.fmt == "squashfs":
        cmd = ["mksquashfs", str(src), str(recipe.image), "-noappend", "-quiet", "-no-progress"]
        cmd.append("-all-root")
    elif recipe.fmt == "erofs":
        cmd = ["mkfs.erofs", "--quiet", "--all-root", str(recipe.image), str(src)]
    else:
        raise ValueError(recipe.fmt)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(src)
    stamp.write_text(recipe.key())
    return recipe.image


def build_all(recipes: Iterable[Recipe]) -> None:
    todo = [r for r in recipes]
    for i, recipe in enumerate(todo):
        if i % 50 == 0 or recipe.files >= 1000:
            log(f"image {recipe.name} ({recipe.files} files, {recipe.fmt})")
        build(recipe)


# --------------------------------------------------------------------------------------------
# statistics and output


def summary(values: Sequence[float]) -> dict[str, object]:
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0, "values": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "values": list(values),
    }


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
