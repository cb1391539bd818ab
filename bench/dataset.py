"""The benchmark's data set, built from nothing and kept between runs.

Trees of small files are written under `bench/data/trees/`, packed into squashfs and erofs
images under `bench/data/images/` (git-ignored), and kept: an image is rebuilt only when its
recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from progress import log
from settings import BIG_FILES, DATA, HOT_FILES, LAYERS, SCALE_FILES, SCALE_SPARE, STACK_FILES
from testkit.images import pack_image

IMAGES = DATA / "images"
TREES = DATA / "trees"

STACK_A = ["stk1", "stk2", "stk3"]
STACK_B = ["stk4", "stk5", "stk6"]


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
    release: int = 1  # another release of the same personality (other bytes, same name)

    def key(self) -> str:
        fields = dict(self.__dict__)
        if fields["release"] == 1:  # the key of every first release stays what it was
            del fields["release"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def image(self) -> Path:
        suffix = "" if self.release == 1 else f"-r{self.release}"
        return IMAGES / f"{self.name}{suffix}.{self.fmt}"


def stack_recipes() -> list[Recipe]:
    """Stacks A and B: 3 personalities each, squashfs and erofs, conflicts, /usr and /etc."""
    fmts = ["squashfs", "erofs"]
    return [
        Recipe(n, STACK_FILES, fmts[i % 2], conflicts=50, shared=True, etc=True)
        for i, n in enumerate(STACK_A + STACK_B)
    ]


def big_recipes() -> list[Recipe]:
    """Three 100,000-file volumes (20,000 in quick mode) for indexing and memory."""
    fmts = ["squashfs", "erofs", "squashfs"]
    return [Recipe(f"big{i + 1}", BIG_FILES, fmts[i], deep=True) for i in range(3)]


HOT = Recipe("hot", HOT_FILES, "squashfs")


def hot_recipes() -> list[Recipe]:
    return [HOT]


def updated(recipe: Recipe) -> Recipe:
    """The next release of `recipe`: the same files, another IMAGE_VERSION (and image)."""
    return replace(recipe, release=recipe.release + 1)


def file_stack_recipes() -> list[Recipe]:
    """Stack A (as image files), and the second release of its middle personality."""
    first = stack_recipes()[:3]
    return [*first, updated(first[1])]


def scale_recipes() -> list[Recipe]:
    """SCALE_FILES one-file personalities, plus SCALE_SPARE more moved in and out meanwhile."""
    count = SCALE_FILES + SCALE_SPARE
    return [Recipe(f"scl{i:04d}", 1, "squashfs") for i in range(count)]


def layer_recipes() -> list[Recipe]:
    """500 one-file personalities for the layer limit."""
    return [Recipe(f"lay{i:03d}", 1, "squashfs") for i in range(LAYERS)]


def _file_dir(recipe: Recipe, top: Path, i: int, per_dir: int) -> Path:
    if recipe.deep:
        return top / f"g{i // 10000:02d}" / f"d{(i // per_dir) % 100:02d}"
    return top / f"d{i // per_dir:03d}"


def _write_extras(recipe: Recipe, src: Path) -> None:
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


def _write_tree(recipe: Recipe, src: Path) -> None:
    if src.exists():
        shutil.rmtree(src)
    top = src / "usr" / "share" / f"bench-{recipe.name}"
    per_dir = 100
    for i in range(recipe.files):
        d = _file_dir(recipe, top, i, per_dir)
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(f"{recipe.name} {i}\n".encode())
    _write_extras(recipe, src)
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
    pack_image(src, recipe.image, recipe.fmt)
    shutil.rmtree(src)
    stamp.write_text(recipe.key())
    return recipe.image


def build_all(recipes: Iterable[Recipe]) -> None:
    for i, recipe in enumerate(recipes):
        if i % 50 == 0 or recipe.files >= 1000:
            log(f"image {recipe.name} ({recipe.files} files, {recipe.fmt})")
        build(recipe)
