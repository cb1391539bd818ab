from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import find_conflicts

from personalityd.core.messages import conflict_message
from personalityd.core.model import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    OPAQUE_DIR,
    SOCKET,
    SYMLINK,
    WHITEOUT,
    Conflict,
)

d, o, f, ln, w = DIR, OPAQUE_DIR, FILE, SYMLINK, WHITEOUT

Layers = list[tuple[str, dict[str, str]]]


class Recorder:
    """The two callbacks, recording how they were called."""

    def __init__(self, base: dict[str, str], same: bool | Callable[[str], bool] = False) -> None:
        self.base = base
        self.same = same
        self.base_calls: list[str] = []
        self.identical_calls: list[tuple[str, tuple[str, ...]]] = []

    def base_kind(self, path: str) -> str | None:
        self.base_calls.append(path)
        return self.base.get(path)

    def identical(self, path: str, names: Sequence[str]) -> bool:
        self.identical_calls.append((path, tuple(names)))
        return self.same(path) if callable(self.same) else self.same


def run(
    layers: Layers, base: dict[str, str] | None = None, same: bool = False
) -> tuple[list[Conflict], int, Recorder]:
    recorder = Recorder(base or {}, same)
    conflicts, overrides = find_conflicts("/usr", layers, recorder.base_kind, recorder.identical)
    return conflicts, overrides, recorder


def c(path: str, winner: str, *shadowed: str, identical: bool = False) -> Conflict:
    return Conflict(
        path="/usr/" + path,
        hierarchy="/usr",
        winner=winner,
        shadowed=shadowed,
        identical=identical,
    )


CASES: list[tuple[str, Layers, dict[str, str], bool, list[Conflict], int]] = [
    # (id, layers top first, base, identical() answer, expected conflicts, expected overrides)
    (
        "file vs file",
        [("web", {"bin": d, "bin/tool": f}), ("ds", {"bin": d, "bin/tool": f})],
        {},
        False,
        [c("bin/tool", "web", "ds")],
        0,
    ),
    (
        "file vs file, identical content",
        [("web", {"bin": d, "bin/tool": f}), ("ds", {"bin": d, "bin/tool": f})],
        {},
        True,
        [c("bin/tool", "web", "ds", identical=True)],
        0,
    ),
    (
        "symlinks with equal targets",
        [("a", {"lib": d, "lib/x.so": ln}), ("b", {"lib": d, "lib/x.so": ln})],
        {},
        True,
        [c("lib/x.so", "a", "b", identical=True)],
        0,
    ),
    (
        "symlinks with different targets",
        [("a", {"lib": d, "lib/x.so": ln}), ("b", {"lib": d, "lib/x.so": ln})],
        {},
        False,
        [c("lib/x.so", "a", "b")],
        0,
    ),
    (
        "symlink over file is never identical",
        [("a", {"x": ln}), ("b", {"x": f})],
        {},
        True,
        [c("x", "a", "b")],
        0,
    ),
    (
        "file over dir: one conflict, the dir's contents are not reported",
        [("a", {"x": f}), ("b", {"x": d, "x/y": f})],
        {},
        True,
        [c("x", "a", "b")],
        0,
    ),
    (
        "dir over file",
        [("a", {"x": d, "x/y": f}), ("b", {"x": f})],
        {},
        True,
        [c("x", "a", "b")],
        0,
    ),
    (
        "whiteout over file",
        [("a", {"x": w}), ("b", {"x": f})],
        {},
        True,
        [c("x", "a", "b")],
        0,
    ),
    (
        "file over whiteout",
        [("a", {"x": f}), ("b", {"x": w})],
        {},
        True,
        [c("x", "a", "b")],
        0,
    ),
    (
        "whiteout over dir hides its contents",
        [("a", {"x": w}), ("b", {"x": d, "x/y": f}), ("c", {"x": d, "x/y": f})],
        {},
        False,
        [c("x", "a", "b", "c")],
        0,
    ),
    (
        "devices, fifos and sockets conflict",
        [("a", {"n": CHAR_DEVICE, "m": SOCKET}), ("b", {"n": FIFO, "m": BLOCK_DEVICE})],
        {},
        True,
        [c("m", "a", "b"), c("n", "a", "b")],
        0,
    ),
    (
        "dirs merge",
        [("a", {"bin": d, "bin/a": f}), ("b", {"bin": d, "bin/b": f}), ("c", {"bin": d})],
        {},
        False,
        [],
        0,
    ),
    (
        "opaque dir over dir: conflict at the dir only",
        [("a", {"x": o, "x/y": f}), ("b", {"x": d, "x/y": f, "x/z": f})],
        {},
        False,
        [c("x", "a", "b")],
        0,
    ),
    (
        "dir over opaque dir: the opaque layer still merges into the one above",
        [
            ("a", {"x": d, "x/y": f}),
            ("b", {"x": o, "x/y": f}),
            ("c", {"x": d, "x/y": f, "x/z": f}),
        ],
        {},
        False,
        [c("x", "a", "b", "c"), c("x/y", "a", "b")],
        0,
    ),
    (
        "opaque dir alone is not a conflict",
        [("a", {"x": o, "x/y": f}), ("b", {"etc": d})],
        {},
        False,
        [],
        0,
    ),
    (
        "three layers",
        [
            ("top", {"bin": d, "bin/tool": f}),
            ("mid", {"bin": d, "bin/tool": f}),
            ("low", {"bin": d, "bin/tool": f}),
        ],
        {},
        False,
        [c("bin/tool", "top", "mid", "low")],
        0,
    ),
    (
        "three layers, a file in the middle blocks the bottom's contents",
        [("a", {"x": d, "x/y": f}), ("b", {"x": f}), ("c", {"x": d, "x/y": f})],
        {},
        False,
        [c("x", "a", "b", "c")],
        0,
    ),
    (
        "blocked descendants are not reported",
        [
            ("a", {"x": f}),
            ("b", {"x": d, "x/y": d, "x/y/z": f}),
            ("c", {"x": d, "x/y": d, "x/y/z": f}),
        ],
        {},
        False,
        [c("x", "a", "b", "c")],
        0,
    ),
    (
        "conflicts deep below merging dirs",
        [
            ("a", {"x": d, "x/y": d, "x/y/z": f}),
            ("b", {"x": d, "x/y": d, "x/y/z": f}),
        ],
        {},
        False,
        [c("x/y/z", "a", "b")],
        0,
    ),
    (
        "overriding a base file is counted, not a conflict",
        [("a", {"bin": d, "bin/tool": f, "bin/new": f})],
        {"bin": d, "bin/tool": f},
        False,
        [],
        1,
    ),
    (
        "a whiteout deleting a base file is an override",
        [("a", {"bin": d, "bin/gone": w})],
        {"bin": d, "bin/gone": f},
        False,
        [],
        1,
    ),
    (
        "an opaque dir replacing a base dir is one override, its contents are not",
        [("a", {"x": o, "x/y": f})],
        {"x": d, "x/y": f},
        False,
        [],
        1,
    ),
    (
        "a dir merging with the base dir is no override",
        [("a", {"bin": d})],
        {"bin": d},
        False,
        [],
        0,
    ),
    (
        "a conflict that also overrides the base",
        [("a", {"x": f}), ("b", {"x": f})],
        {"x": f},
        False,
        [c("x", "a", "b")],
        1,
    ),
    (
        "nothing below a personality's file reaches the base",
        [("a", {"x": f}), ("b", {"x": d, "x/y": f})],
        {"x": d, "x/y": f},
        False,
        [c("x", "a", "b")],
        1,
    ),
    (
        "a lower personality's file shadows the base below an upper dir",
        [("a", {"x": d, "x/y": f}), ("b", {"x": f})],
        {"x": d, "x/y": f},
        False,
        [c("x", "a", "b")],
        0,
    ),
    (
        "an index without its parent directories: they count as merging dirs",
        [("a", {"x/y": f, "x/z": f}), ("b", {"x": d, "x/y": f}), ("c", {"q/r": f})],
        {"x": d, "x/z": f, "q": d, "q/r": f},
        False,
        [c("x/y", "a", "b")],
        2,
    ),
    (
        "an index without its parent directories, below a file of another layer",
        [("a", {"x/y": f}), ("b", {"x": f})],
        {"x": d, "x/y": f},
        False,
        [],
        1,
    ),
    ("no layers", [], {"x": f}, False, [], 0),
    ("empty layers", [("a", {}), ("b", {})], {"x": f}, False, [], 0),
]


@pytest.mark.parametrize(
    ("layers", "base", "same", "conflicts", "overrides"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_find_conflicts(
    layers: Layers,
    base: dict[str, str],
    same: bool,
    conflicts: list[Conflict],
    overrides: int,
) -> None:
    got, got_overrides, _ = run(layers, base, same)
    assert got == conflicts
    assert got_overrides == overrides


def test_identical_is_asked_only_for_all_files_or_all_symlinks() -> None:
    layers: Layers = [
        ("a", {"f": f, "l": ln, "m": f, "w": w}),
        ("b", {"f": f, "l": ln, "m": ln, "w": w}),
        ("c", {"f": f, "l": ln}),
    ]
    _, _, recorder = run(layers, same=True)
    assert sorted(recorder.identical_calls) == [("f", ("a", "b", "c")), ("l", ("a", "b", "c"))]


def test_base_is_asked_only_for_replacing_winners_it_reaches() -> None:
    layers: Layers = [
        ("a", {"bin": d, "bin/tool": f, "x": o, "x/y": f, "z": f}),
        ("b", {"bin": d, "bin/tool": f, "z": d, "z/q": f, "lib": d, "lib/l": ln}),
    ]
    _, _, recorder = run(layers)
    assert sorted(recorder.base_calls) == ["bin/tool", "lib/l", "x", "z"]


def test_hierarchy_in_paths_and_sorted() -> None:
    layers: Layers = [
        ("a", {"b": f, "a-b": f, "a": d, "a/b": f}),
        ("b", {"b": f, "a-b": f, "a": d, "a/b": f}),
    ]
    recorder = Recorder({})
    got, _ = find_conflicts("/etc", layers, recorder.base_kind, recorder.identical)
    assert [x.path for x in got] == ["/etc/a-b", "/etc/a/b", "/etc/b"]
    assert {x.hierarchy for x in got} == {"/etc"}


@pytest.mark.parametrize(
    ("conflict", "message"),
    [
        (
            Conflict("/usr/bin/tool", "/usr", "web", ("datascience",), False),
            "Conflict on /usr/bin/tool: 'web' (attached last) shadows 'datascience'",
        ),
        (
            Conflict("/usr/bin/tool", "/usr", "web", ("a", "b"), False),
            "Conflict on /usr/bin/tool: 'web' (attached last) shadows 'a', 'b'",
        ),
        (
            Conflict("/etc/motd", "/etc", "web", ("a",), True),
            "Conflict on /etc/motd: 'web' (attached last) shadows 'a' (identical content)",
        ),
    ],
)
def test_conflict_message(conflict: Conflict, message: str) -> None:
    assert conflict_message(conflict) == message


# --- agreement with a slow reference that simulates overlayfs lookups path by path ---


def reference(
    layers: Layers, base: dict[str, str], same: Callable[[str], bool]
) -> tuple[list[Conflict], int, set[str]]:
    """Resolve every path as overlayfs does, component by component, top layer first."""
    names = [name for name, _ in layers]
    trees = [tree for _, tree in layers]
    paths = {p for tree in trees for p in tree}

    def lookup_dir(path: str) -> tuple[list[int], bool]:
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

    conflicts: list[Conflict] = []
    overrides = 0
    asked: set[str] = set()
    for path in sorted(paths):
        parent = path.rpartition("/")[0]
        merged, base_merged = lookup_dir(parent)
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
        if kinds[0] != DIR and base_merged:
            asked.add(path)
            if path in base:
                overrides += 1
    return sorted(conflicts, key=lambda x: x.path), overrides, asked


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
    got, overrides = find_conflicts("/usr", layers, recorder.base_kind, recorder.identical)
    want, want_overrides, asked = reference(layers, base, same)
    assert got == want
    assert overrides == want_overrides
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
