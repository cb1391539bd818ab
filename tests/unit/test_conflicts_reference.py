"""The reference conflict rule (oracles.find_conflicts) against a second one that simulates
overlayfs lookups path by path (hypothesis), and on layers of 30,000 entries."""

from __future__ import annotations

from collections.abc import Callable

from conflict_calls import Layers, Recorder, c, d, f, ln, o, run, w
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import find_conflicts

from personalityd.core.model import (
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    MASK_DELETED,
    MASK_HIDDEN,
    OPAQUE_DIR,
    SYMLINK,
    WHITEOUT,
    Conflict,
    Mask,
)

# --- agreement with a slow reference that simulates overlayfs lookups path by path ---


def reference(
    layers: Layers, base: dict[str, str], same: Callable[[str], bool]
) -> tuple[list[Conflict], int, list[Mask], set[str]]:
    """Resolve every path as overlayfs does, component by component, top layer first."""
    names = [name for name, _ in layers]
    trees = [tree for _, tree in layers]
    paths = {p for tree in trees for p in tree}

    conflicts: list[Conflict] = []
    masks: list[Mask] = []
    overrides = 0
    asked: set[str] = set()
    for path in sorted(paths):
        parent = path.rpartition("/")[0]
        merged, base_merged = lookup_dir(trees, parent)
        providers = [k for k in merged if path in trees[k]]
        if not providers:
            continue
        kinds = [trees[k][path] for k in providers]
        if len(providers) > 1 and any(kind != DIR for kind in kinds):
            identical = False
            if set(kinds) in ({FILE}, {SYMLINK}):
                identical = same(path)
            shown = [names[k] for k in providers]
            conflicts.append(
                Conflict("/usr/" + path, "/usr", shown[0], tuple(shown[1:]), identical)
            )
        if not base_merged:
            continue
        change = base_change(kinds, base.get(path))
        if change is not None:
            asked.add(path)
            j, outcome = change
            if outcome == "override":
                overrides += 1
            elif outcome:
                masks.append(Mask("/usr/" + path, "/usr", names[providers[j]], outcome))
    return sorted(conflicts, key=lambda x: x.path), overrides, masks, asked


def lookup_dir(trees: list[dict[str, str]], path: str) -> tuple[list[int], bool]:
    """The layers merged into directory `path`, and whether the base is merged too."""
    merged = list(range(len(trees)))
    base_merged = True
    if not path:
        return merged, base_merged
    for depth in range(1, path.count("/") + 2):
        component_path = "/".join(path.split("/")[:depth])
        below: list[int] = []
        for k in merged:
            kind = trees[k].get(component_path)
            if kind is None:
                continue
            if kind == DIR:
                below.append(k)
                continue
            if kind == OPAQUE_DIR:
                below.append(k)
            base_merged = False  # an opaque dir or a non-dir stops the lookup here
            break
        merged = below
    return merged, base_merged


def base_change(kinds: list[str], base: str | None) -> tuple[int, str] | None:
    """The lookup of a path the base reaches, with the kinds of its providers top first:
    merging directories let it go on to the next layer, and the first entry that does not
    merge decides what becomes of the base's entry. None when the base's entry is not looked
    at; else (which provider, "override", a mask, or "" for nothing)."""
    for j, kind in enumerate(kinds):
        if kind == DIR:
            continue
        if j > 0 and kind not in (WHITEOUT, OPAQUE_DIR):
            return None  # a lower personality's entry replaces the base's: not ours to count
        mask = base_mask(kind, base)
        if mask is not None:
            return j, mask
        return j, "override" if j == 0 and base is not None else ""
    return None


def base_mask(kind: str, base: str | None) -> str | None:
    """What an entry that stops the lookup does to the base's entry: delete it, hide it."""
    if base is None:
        return None
    if kind == WHITEOUT:
        return MASK_DELETED
    if kind == OPAQUE_DIR and base in (DIR, OPAQUE_DIR):
        return MASK_HIDDEN
    return None


KINDS = st.sampled_from([d, d, d, o, f, f, ln, w, CHAR_DEVICE, FIFO])


PATHS = st.lists(st.sampled_from("abc"), min_size=1, max_size=3).map("/".join)


def consistent(entries: dict[str, str]) -> dict[str, str]:
    """A real tree: every ancestor of an entry is a directory (added as DIR if missing)."""
    tree: dict[str, str] = {}
    for path in sorted(entries, key=lambda p: p.count("/")):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(tree.get(a, d) not in (d, o) for a in ancestors):
            continue
        for a in ancestors:
            tree.setdefault(a, d)
        tree.setdefault(path, entries[path])
    return tree


TREES = st.dictionaries(PATHS, KINDS, max_size=12).map(consistent)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(TREES, min_size=2, max_size=4),
    st.dictionaries(PATHS, KINDS, max_size=8),
    st.integers(min_value=0, max_value=2),
)
def test_agrees_with_reference(
    trees: list[dict[str, str]], base: dict[str, str], salt: int
) -> None:
    layers: Layers = [(f"p{i}", tree) for i, tree in enumerate(trees)]

    def same(path: str) -> bool:
        return (len(path) + salt) % 2 == 0

    recorder = Recorder(base, same)
    got, overrides, masks = find_conflicts(
        "/usr", layers, recorder.base_kind, recorder.identical
    )
    want, want_overrides, want_masks, asked = reference(layers, base, same)
    assert got == want
    assert overrides == want_overrides
    assert masks == want_masks
    assert sorted(recorder.base_calls) == sorted(asked)  # each candidate asked exactly once
    asked_identical = [path for path, _ in recorder.identical_calls]
    assert len(asked_identical) == len(set(asked_identical))


def test_large_layers_scale() -> None:
    """Three layers of 30,000 entries each with overlaps: the result is what it should be."""
    layers: Layers = []
    for name in ("c", "b", "a"):
        tree = {f"d{i}": d for i in range(100)}
        tree.update({f"d{i}/{name}{j}": f for i in range(100) for j in range(300)})
        tree.update({f"d{i}/shared": f for i in range(100)})
        layers.append((name, tree))
    got, overrides, recorder = run(layers, {"d0/shared": f})
    assert len(got) == 100
    assert got[0] == c("d0/shared", "c", "b", "a")
    assert overrides == 1
    assert len(recorder.base_calls) == 3 * 100 * 300 + 100
