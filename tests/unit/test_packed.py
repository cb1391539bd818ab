"""The packed index (core/packed.py) against the reference walker and conflict rule (oracles.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import base_names, find_conflicts, index_volume, pack, to_dict

from personalityd.adapters.indexer import BaseNames, index_volume_packed
from personalityd.core.model import (
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    OPAQUE_DIR,
    SYMLINK,
    WHITEOUT,
    Conflict,
    Mask,
)
from personalityd.core.packed import EMPTY, find_conflicts_packed

KINDS = [DIR, OPAQUE_DIR, FILE, SYMLINK, WHITEOUT, CHAR_DEVICE, FIFO]
NAMES = ["a", "b", "c", "bin", "lib", "x y", "é", "a-b"]


@st.composite
def trees(draw: st.DrawFn, max_depth: int = 3) -> dict[str, str]:
    """A well-formed tree: every parent of an entry is a directory entry."""
    tree: dict[str, str] = {}

    def fill(prefix: str, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4)):
            path = prefix + name
            kind = draw(st.sampled_from(KINDS if depth < max_depth else KINDS[2:]))
            tree[path] = kind
            if kind in (DIR, OPAQUE_DIR):
                fill(path + "/", depth + 1)

    fill("", 0)
    return tree


def _dict_result(
    layers: Sequence[tuple[str, dict[str, str]]], base: dict[str, str]
) -> tuple[list[Conflict], int, list[Mask]]:
    return find_conflicts("/usr", layers, base.get, lambda p, names: p.endswith("b"))


def _packed_result(
    layers: Sequence[tuple[str, dict[str, str]]], base: dict[str, str]
) -> tuple[list[Conflict], int, list[Mask]]:
    packed = [(name, pack(tree)) for name, tree in layers]
    return find_conflicts_packed("/usr", packed, base_names(base), lambda p, names: p.endswith("b"))


@settings(max_examples=400, deadline=None)
@given(st.lists(trees(), min_size=1, max_size=4), trees())
def test_same_conflicts_overrides_and_masks_as_the_dict_version(
    layer_trees: list[dict[str, str]], base: dict[str, str]
) -> None:
    layers = [(f"p{i}", tree) for i, tree in enumerate(layer_trees)]
    expected = _dict_result(layers, base)
    assert _packed_result(layers, base) == expected


@given(trees())
def test_pack_round_trips(tree: dict[str, str]) -> None:
    packed = pack(tree)
    assert to_dict(packed) == tree
    assert len(packed) == len(tree)


def test_empty() -> None:
    assert len(EMPTY) == 0
    assert to_dict(EMPTY) == {}


def test_packed_indexer_matches_dict_indexer(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/tool").write_text("x")
    (tmp_path / "usr/lib/deep/er").mkdir(parents=True)
    (tmp_path / "usr/lib/deep/er/f").write_text("y")
    (tmp_path / "usr/lib/link").symlink_to("deep")
    os.mkfifo(tmp_path / "usr/fifo")
    (tmp_path / "usr" / os.fsdecode(b"bad\xffname")).write_text("z")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/conf").write_text("c")
    packed = index_volume_packed(str(tmp_path), ["/usr", "/etc", "/opt"])
    plain = index_volume(str(tmp_path), ["/usr", "/etc", "/opt"])
    assert set(packed) == set(plain) == {"/usr", "/etc"}
    for h in plain:
        assert to_dict(packed[h]) == plain[h]


def test_base_names(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/sh").write_text("")
    (tmp_path / "file").write_text("")
    names = BaseNames(str(tmp_path))
    assert names(b"bin") == frozenset({b"sh"})
    assert names(b"") == frozenset({b"bin", b"file"})
    assert names(b"missing") is None
    assert names(b"file") is None
