"""The reference conflict rule (oracles.find_conflicts) on tables of layers (top first) and
base entries, how it uses its callbacks, and the message of a conflict."""

from __future__ import annotations

import pytest
from conflict_calls import Layers, Recorder, c, d, deleted, f, hidden, ln, o, run, run_all, w
from oracles import find_conflicts

from personalityd.core.messages import conflict_message
from personalityd.core.model import BLOCK_DEVICE, CHAR_DEVICE, FIFO, SOCKET, Conflict, Mask

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
        "a whiteout deleting a base file is a mask, not an override",
        [("a", {"bin": d, "bin/gone": w})],
        {"bin": d, "bin/gone": f},
        False,
        [],
        0,
    ),
    (
        "an opaque dir hiding a base dir is a mask, not an override",
        [("a", {"x": o, "x/y": f})],
        {"x": d, "x/y": f},
        False,
        [],
        0,
    ),
    (
        "an opaque dir replacing a base file is an override",
        [("a", {"x": o, "x/y": f})],
        {"x": f},
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


MASK_CASES: list[tuple[str, Layers, dict[str, str], list[Conflict], list[Mask], int]] = [
    # (id, layers top first, base, expected conflicts, expected masks, expected overrides)
    (
        "a whiteout over a base file deletes it",
        [("a", {"bin": d, "bin/gone": w})],
        {"bin": d, "bin/gone": f},
        [],
        [deleted("bin/gone", "a")],
        0,
    ),
    (
        "a whiteout over a base directory deletes it, and only it is reported",
        [("a", {"x": w})],
        {"x": d, "x/y": f},
        [],
        [deleted("x", "a")],
        0,
    ),
    ("a whiteout over nothing of the base is no mask", [("a", {"x": w})], {"y": f}, [], [], 0),
    (
        "an opaque directory over a base directory hides it; its own entries are not reported",
        [("a", {"x": o, "x/y": w, "x/z": f})],
        {"x": d, "x/y": f, "x/z": f},
        [],
        [hidden("x", "a")],
        0,
    ),
    ("an opaque directory over nothing is no mask", [("a", {"x": o})], {"y": d}, [], [], 0),
    (
        "an opaque directory over a base file overrides it",
        [("a", {"x": o})],
        {"x": f},
        [],
        [],
        1,
    ),
    (
        "a whiteout below a higher personality's file is not reached",
        [("a", {"x": f}), ("b", {"x": d, "x/y": w})],
        {"x": d, "x/y": f},
        [c("x", "a", "b")],
        [],
        1,
    ),
    (
        "a whiteout over another personality's file and the base's: a conflict and a mask",
        [("a", {"x": w}), ("b", {"x": f})],
        {"x": f},
        [c("x", "a", "b")],
        [deleted("x", "a")],
        0,
    ),
    (
        "a lower whiteout under a merging directory still deletes the base's entry",
        [("a", {"x": d, "x/z": f}), ("b", {"x": w})],
        {"x": d, "x/y": f},
        [c("x", "a", "b")],
        [deleted("x", "b")],
        0,
    ),
    (
        "a lower opaque directory under a merging directory hides the base's",
        [("a", {"x": d}), ("b", {"x": o})],
        {"x": d},
        [c("x", "a", "b")],
        [hidden("x", "b")],
        0,
    ),
    (
        "a lower file under a merging directory is a conflict, not a mask nor an override",
        [("a", {"x": d}), ("b", {"x": f})],
        {"x": d},
        [c("x", "a", "b")],
        [],
        0,
    ),
    (
        "masks deep below merging directories, sorted by path",
        [
            ("a", {"bin": d, "bin/t": w, "share": d, "share/doc": o}),
            ("b", {"bin": d, "bin/s": w, "lib": d, "lib/x": w}),
        ],
        {"bin": d, "bin/s": f, "bin/t": f, "lib": d, "share": d, "share/doc": d},
        [],
        [deleted("bin/s", "b"), deleted("bin/t", "a"), hidden("share/doc", "a")],
        0,
    ),
    (
        "below a base file there is nothing to mask",
        [("a", {"x/y": w})],
        {"x": f},
        [],
        [],
        0,
    ),
]


@pytest.mark.parametrize(
    ("layers", "base", "conflicts", "masks", "overrides"),
    [case[1:] for case in MASK_CASES],
    ids=[case[0] for case in MASK_CASES],
)
def test_masks(
    layers: Layers,
    base: dict[str, str],
    conflicts: list[Conflict],
    masks: list[Mask],
    overrides: int,
) -> None:
    got, got_overrides, got_masks, _ = run_all(layers, base)
    assert (got, got_masks, got_overrides) == (conflicts, masks, overrides)


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
    got, _, _ = find_conflicts("/etc", layers, recorder.base_kind, recorder.identical)
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
