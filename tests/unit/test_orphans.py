"""The orphan rule (core/orphans.py): which upper paths leave the stack with a personality.

Examples first, then hypothesis against a path-by-path reference written from the rule's
words: an upper entry whose path the old lower stack shows as a directory made (also) by a
leaving personality, the new lower stack shows nothing at, whose parent the new stack still
shows as a directory, with only plain directories of the upper on the way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import base_names, pack

from personalityd.core.model import DIR, FILE, OPAQUE_DIR, SYMLINK, WHITEOUT
from personalityd.core.orphans import Orphan, find_orphans

Tree = Mapping[str, str]  # relative path -> kind


def _orphans(
    old: Sequence[tuple[str, Tree]],
    new: Sequence[tuple[str, Tree]],
    base: Tree,
    upper: Tree,
) -> list[tuple[str, str]]:
    """(relpath, name) of the orphans of /usr; `old` and `new` top first."""
    leaving = {n for n, _ in old} - {n for n, _ in new}
    found = find_orphans(
        "/usr",
        [(n, pack(t)) for n, t in old],
        [(n, pack(t)) for n, t in new],
        leaving,
        base_names(base),
        lambda rel: upper.get(os.fsdecode(rel)),
    )
    return [(os.fsdecode(o.relpath), o.name) for o in found]


NUMPY = {
    "lib": DIR,
    "lib/python3": DIR,
    "lib/python3/dist-packages": DIR,
    "lib/python3/dist-packages/numpy": DIR,
    "lib/python3/dist-packages/numpy/__init__.py": FILE,
    "lib/python3/dist-packages/numpy/core": DIR,
    "lib/python3/dist-packages/numpy/core/x.py": FILE,
    "bin": DIR,
    "bin/f2py": FILE,
}
SCIPY = {
    "lib": DIR,
    "lib/python3": DIR,
    "lib/python3/dist-packages": DIR,
    "lib/python3/dist-packages/scipy": DIR,
    "lib/python3/dist-packages/scipy/__init__.py": FILE,
}
BASE = {"bin": DIR, "bin/sh": FILE, "share": DIR, "share/doc": DIR, "lib": DIR}


def test_pycache_under_a_detached_package_is_an_orphan_named_after_it() -> None:
    upper = {
        "lib": DIR,
        "lib/python3": DIR,
        "lib/python3/dist-packages": DIR,
        "lib/python3/dist-packages/numpy": DIR,
        "lib/python3/dist-packages/numpy/__pycache__": DIR,
        "lib/python3/dist-packages/numpy/__pycache__/__init__.pyc": FILE,
    }
    found = _orphans([("numpy", NUMPY)], [], BASE, upper)
    # The topmost path that only numpy made: lib/python3 (the base has lib, not python3).
    assert found == [("lib/python3", "numpy")]
    # With scipy staying, the shared dist-packages stays; numpy's own directory goes.
    found = _orphans([("scipy", SCIPY), ("numpy", NUMPY)], [("scipy", SCIPY)], BASE, upper)
    assert found == [("lib/python3/dist-packages/numpy", "numpy")]


def test_a_file_written_into_a_directory_that_stays_is_not_an_orphan() -> None:
    upper = {
        "bin": DIR,
        "bin/admin-tool": FILE,
        "share": DIR,
        "share/doc": DIR,
        "share/doc/x": FILE,
    }
    assert _orphans([("numpy", NUMPY)], [], BASE, upper) == []
    shared = {"lib": DIR, "lib/python3": DIR, "lib/python3/dist-packages": DIR}
    upper = {**shared, "lib/python3/dist-packages/admin.pth": FILE}
    assert _orphans([("scipy", SCIPY), ("numpy", NUMPY)], [("scipy", SCIPY)], BASE, upper) == []


def test_nothing_in_the_upper_means_no_orphan_and_nothing_leaving_means_none() -> None:
    assert _orphans([("numpy", NUMPY)], [], BASE, {}) == []
    upper = {"lib": DIR, "lib/python3": DIR}
    assert _orphans([("numpy", NUMPY)], [("numpy", NUMPY)], BASE, upper) == []


def test_a_directory_an_arriving_personality_provides_too_is_not_an_orphan() -> None:
    upper = {"lib": DIR, "lib/python3": DIR, "lib/python3/dist-packages": DIR}
    upper["lib/python3/dist-packages/numpy"] = DIR
    found = _orphans([("numpy", NUMPY)], [("numpy2", NUMPY)], BASE, upper)
    assert found == []


def test_below_an_opaque_directory_of_the_upper_nothing_is_an_orphan() -> None:
    upper = {"lib": DIR, "lib/python3": OPAQUE_DIR, "lib/python3/dist-packages": DIR}
    # The opaque directory itself is at a path only numpy made: it goes as a whole.
    assert _orphans([("numpy", NUMPY)], [], BASE, upper) == [("lib/python3", "numpy")]
    shared = {**BASE, "lib/python3": DIR}
    assert _orphans([("numpy", NUMPY)], [], shared, upper) == []


def test_a_whiteout_or_a_file_the_upper_put_in_place_of_the_directory_goes_too() -> None:
    shared = {**BASE, "lib/python3": DIR, "lib/python3/dist-packages": DIR}
    prefix = {"lib": DIR, "lib/python3": DIR, "lib/python3/dist-packages": DIR}
    for kind in (WHITEOUT, FILE, SYMLINK):
        upper = {**prefix, "lib/python3/dist-packages/numpy": kind}
        found = _orphans([("numpy", NUMPY)], [], shared, upper)
        assert found == [("lib/python3/dist-packages/numpy", "numpy")], kind


def test_a_directory_hidden_in_the_old_stack_by_a_higher_layer_is_not_an_orphan() -> None:
    """An opaque directory of a staying personality above: the leaver's directory below it
    never showed, so what the upper holds there was written over the staying one's."""
    hider = {"lib": DIR, "lib/python3": OPAQUE_DIR, "lib/python3/mine": FILE}
    upper = {"lib": DIR, "lib/python3": DIR, "lib/python3/dist-packages": DIR}
    assert _orphans([("hider", hider), ("numpy", NUMPY)], [("hider", hider)], BASE, upper) == []


def test_the_topmost_leaving_personality_is_named() -> None:
    upper = {"lib": DIR, "lib/python3": DIR}
    found = _orphans([("scipy", SCIPY), ("numpy", NUMPY)], [], BASE, upper)
    assert found == [("lib/python3", "scipy")]


def test_orphan_path_is_the_stacked_path() -> None:
    assert Orphan("/usr", b"lib/x", "n").path == "/usr/lib/x"


# -- hypothesis against the path-by-path reference -----------------------------------------

KINDS = [DIR, DIR, DIR, OPAQUE_DIR, FILE, WHITEOUT]
NAMES = ["a", "b", "c"]


@st.composite
def trees(draw: st.DrawFn, max_depth: int = 3) -> dict[str, str]:
    tree: dict[str, str] = {}

    def fill(prefix: str, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
            kind = draw(st.sampled_from(KINDS if depth < max_depth else KINDS[4:]))
            tree[prefix + name] = kind
            if kind in (DIR, OPAQUE_DIR):
                fill(prefix + name + "/", depth + 1)

    fill("", 0)
    return tree


def _lookup(layers: Sequence[Tree], path: str) -> tuple[str | None, list[int]]:
    """What overlayfs shows at `path` over `layers` (top first): the kind (DIR for a merged
    directory) and the indexes of the layers that make it when it is a directory."""
    makers = list(range(len(layers)))
    parts = path.split("/")
    kind: str | None = DIR
    for i in range(len(parts)):
        prefix = "/".join(parts[: i + 1])
        if kind != DIR:
            return None, []
        below: list[int] = []
        kind = None
        for k in makers:
            entry = layers[k].get(prefix)
            if entry is None:
                continue
            if entry in (DIR, OPAQUE_DIR):
                below.append(k)
                kind = DIR
                if entry == OPAQUE_DIR:
                    break
                continue
            if not below and entry != WHITEOUT:
                kind = entry
            break
        makers = below
    return kind, makers


def _reference(
    old: Sequence[tuple[str, Tree]],
    new: Sequence[tuple[str, Tree]],
    base: Tree,
    upper: Tree,
) -> list[tuple[str, str]]:
    leaving = {n for n, _ in old} - {n for n, _ in new}
    old_layers = [t for _, t in old] + [base]
    new_layers = [t for _, t in new] + [base]
    old_names = [n for n, _ in old] + [""]
    found = []
    for path in sorted(upper):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(upper.get(a) != DIR for a in ancestors):
            continue  # below an opaque directory, a file or a whiteout of the upper
        kind, makers = _lookup(old_layers, path)
        leavers = [old_names[k] for k in makers if old_names[k] in leaving]
        if kind != DIR or not leavers:
            continue
        if _lookup(new_layers, path)[0] is not None:
            continue
        parent = "/".join(parts[:-1])
        if parent and _lookup(new_layers, parent)[0] != DIR:
            continue  # its parent goes as a whole (or is not there)
        if parent and not any(old_names[k] in leaving for k in _lookup(old_layers, parent)[1]):
            continue
        found.append((path, leavers[0]))
    return found


def _base_tree(tree: dict[str, str]) -> dict[str, str]:
    """A base has no whiteouts or opaque directories of its own."""
    kept = {p: (DIR if k == OPAQUE_DIR else k) for p, k in tree.items() if k != WHITEOUT}
    return {p: k for p, k in kept.items() if all(kept.get(a) == DIR for a in _ancestors(p))}


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@settings(max_examples=400, deadline=None)
@given(
    layers=st.lists(trees(), min_size=1, max_size=4),
    leaving=st.lists(st.booleans(), min_size=4, max_size=4),
    base=trees(),
    upper=trees(),
)
def test_matches_the_path_by_path_reference(
    layers: list[dict[str, str]], leaving: list[bool], base: dict[str, str], upper: dict[str, str]
) -> None:
    old = [(f"p{i}", t) for i, t in enumerate(layers)]
    new = [(n, t) for (n, t), gone in zip(old, leaving, strict=False) if not gone]
    base = _base_tree(base)
    assert _orphans(old, new, base, upper) == _reference(old, new, base, upper)
