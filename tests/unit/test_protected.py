"""The protected-paths rule (core/protected.py): tables of volumes, and hypothesis against a
reference that states the rule entry by entry."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import pack

from personalityd.adapters.protected import protected_in_tree
from personalityd.core.model import (
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    OPAQUE_DIR,
    SYMLINK,
    WHITEOUT,
)
from personalityd.core.protected import (
    DEFAULT_PROTECTED_PATHS,
    HINT,
    index_lookup,
    protected_violation,
)

d, o, f, ln, w = DIR, OPAQUE_DIR, FILE, SYMLINK, WHITEOUT
HIERARCHIES = ("/usr", "/etc")

Volume = dict[str, dict[str, str]]  # hierarchy -> relative path -> kind


def check(
    volume: Volume,
    protected: Sequence[str] = DEFAULT_PROTECTED_PATHS,
    hierarchies: Sequence[str] = HIERARCHIES,
) -> str | None:
    provides, kind_at = index_lookup({h: pack(tree) for h, tree in volume.items()})
    return protected_violation(protected, hierarchies, provides, kind_at)


CASES: list[tuple[str, Volume, str | None]] = [
    ("nothing protected", {"/usr": {"bin": d, "bin/tool": f}, "/etc": {"motd": f}}, None),
    ("an empty hierarchy", {"/etc": {}}, None),
    (
        "a file at a protected path",
        {"/etc": {"passwd": f}},
        "it provides the protected path /etc/passwd",
    ),
    ("a symlink there", {"/etc": {"shadow": ln}}, "it provides the protected path /etc/shadow"),
    (
        "a whiteout deleting it",
        {"/etc": {"group": w}},
        "it deletes the protected path /etc/group (a whiteout)",
    ),
    (
        "a file below a protected directory",
        {"/etc": {"sudoers.d": d, "sudoers.d/evil": f}},
        "it provides the protected path /etc/sudoers.d",
    ),
    (
        "the drop-in of the attack",
        {"/etc": {"personalityd": d, "personalityd/personalityd.toml.d": d,
                  "personalityd/personalityd.toml.d/50-x.toml": f}},
        "it provides the protected path /etc/personalityd",
    ),
    (
        "an empty directory at a protected path",
        {"/etc": {"sudoers.d": d}},
        "it provides the protected path /etc/sudoers.d",
    ),
    (
        "an opaque directory at a protected path",
        {"/etc": {"sudoers.d": o}},
        "it provides the protected path /etc/sudoers.d (an opaque directory)",
    ),
    (
        "an opaque directory above one",
        {"/usr": {"lib": o, "lib/extension-release.d": d}},
        "its opaque directory /usr/lib hides the protected path /usr/lib/personalityd",
    ),
    (
        "a whiteout above one",
        {"/usr": {"lib": w}},
        "its whiteout /usr/lib deletes the directory of the protected path /usr/lib/personalityd",
    ),
    (
        "a symlink above one",
        {"/usr": {"lib": ln}},
        "its symlink /usr/lib replaces the directory of the protected path /usr/lib/personalityd",
    ),
    (
        "a FIFO above one",
        {"/usr": {"lib": FIFO}},
        "its FIFO /usr/lib replaces the directory of the protected path /usr/lib/personalityd",
    ),
    (
        "a merging directory above is fine",
        {"/usr": {"lib": d, "lib/x.so": f, "lib/python3": o}},
        None,
    ),
    ("a sibling with a similar name", {"/etc": {"passwd-": f, "shadow.d": d}}, None),
]


@pytest.mark.parametrize(
    ("volume", "reason"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)  # fmt: skip
def test_rule(volume: Volume, reason: str | None) -> None:
    got = check(volume)
    assert got == (None if reason is None else f"{reason}; {HINT}")


def test_first_protected_path_in_configuration_order_is_named() -> None:
    volume: Volume = {"/etc": {"shadow": f, "passwd": f}}
    assert check(volume, ["/etc/shadow", "/etc/passwd"]) == (
        f"it provides the protected path /etc/shadow; {HINT}"
    )
    assert check(volume, ["/etc/passwd", "/etc/shadow"]) == (
        f"it provides the protected path /etc/passwd; {HINT}"
    )


def test_only_the_configuration_protects() -> None:
    volume: Volume = {"/etc": {"passwd": f}, "/usr": {"lib": o}}
    assert check(volume, []) is None
    assert check(volume, ["/etc/passwd"]) is not None
    assert check(volume, ["/usr/lib/os-release"]) is not None
    assert check(volume, ["/opt/x"]) is None  # outside every hierarchy: nothing can touch it


def test_a_protected_hierarchy_and_a_hierarchy_inside_a_protected_path() -> None:
    assert check({"/etc": {}}, ["/etc"]) == f"it provides the protected path /etc; {HINT}"
    assert check({"/usr": {}}, ["/etc"]) is None
    assert check({"/opt/tools": {"x": f}}, ["/opt"], ["/usr", "/opt/tools"]) == (
        f"it provides /opt/tools, inside the protected path /opt; {HINT}"
    )


def test_a_hierarchy_the_volume_does_not_provide_is_not_looked_at() -> None:
    # Only /usr is stacked: a volume's etc/ never reaches the system.
    assert check({"/etc": {"passwd": f}}, hierarchies=["/usr"]) is None


def test_non_utf8_names() -> None:
    name = b"bad\xffname".decode("utf-8", "surrogateescape")
    assert check({"/etc": {name: f}}, [f"/etc/{name}"]) is not None


# --- hypothesis: the rule against a statement of it entry by entry ---

NAMES = ["etc", "lib", "passwd", "os-release", "personalityd", "x"]
KINDS = [d, d, d, o, f, ln, w, CHAR_DEVICE, FIFO]
@st.composite
def trees(draw: st.DrawFn, max_depth: int = 3) -> dict[str, str]:
    tree: dict[str, str] = {}

    def fill(prefix: str, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
            kind = draw(st.sampled_from(KINDS if depth < max_depth else KINDS[3:]))
            tree[prefix + name] = kind
            if kind in (d, o):
                fill(prefix + name + "/", depth + 1)

    fill("", 0)
    return tree


def touched(volume: Mapping[str, Mapping[str, str]], path: str) -> bool:
    """The rule, entry by entry: the volume has something at `path` or below it, something that
    does not merge above it, or provides a hierarchy that lies inside it."""
    for hierarchy, tree in volume.items():
        if hierarchy == path or hierarchy.startswith(path + "/"):
            return True
        if not path.startswith(hierarchy + "/"):
            continue
        relative = path[len(hierarchy) + 1 :]
        for entry, kind in tree.items():
            if entry == relative or entry.startswith(relative + "/"):
                return True
            if relative.startswith(entry + "/") and kind != DIR:
                return True
    return False


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["/usr", "/etc", "/usr2"]), trees(), max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["/usr", "/etc", "/usr2", "/"]),
            st.lists(st.sampled_from(NAMES), max_size=3),
        ).map(lambda t: (t[0].rstrip("/") + "/" + "/".join(t[1])).rstrip("/") or "/etc"),
        max_size=4,
    ),
)
def test_agrees_with_the_rule_entry_by_entry(volume: Volume, protected: list[str]) -> None:
    hierarchies = ["/usr", "/etc", "/usr2"]
    got = check(volume, protected, hierarchies)
    expected = [p for p in protected if touched(volume, p)]
    if not expected:
        assert got is None
        return
    assert got is not None
    named = re.search(r"protected path (.+?)(?:;| \()", got)
    assert named is not None
    assert named.group(1) == expected[0]  # the first protected path touched is the one named


# --- the same rule on a mounted tree (adapters/protected.py), as the probe sees it ---


def test_on_a_tree(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib/python3").mkdir(parents=True)
    assert protected_in_tree(str(tmp_path), DEFAULT_PROTECTED_PATHS, HIERARCHIES) is None
    (tmp_path / "etc/shadow").write_text("x")
    assert protected_in_tree(str(tmp_path), DEFAULT_PROTECTED_PATHS, HIERARCHIES) == (
        f"it provides the protected path /etc/shadow; {HINT}"
    )
    assert protected_in_tree(str(tmp_path), [], HIERARCHIES) is None


def test_on_a_tree_the_way_to_a_path(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    (tmp_path / "usr/lib").symlink_to("/tmp")  # never followed
    assert protected_in_tree(str(tmp_path), ["/usr/lib/os-release"], HIERARCHIES) == (
        "its symlink /usr/lib replaces the directory of the protected path "
        f"/usr/lib/os-release; {HINT}"
    )
    (tmp_path / "usr/lib").unlink()
    (tmp_path / "usr/lib").mkdir()
    os.setxattr(tmp_path / "usr/lib", "trusted.overlay.opaque", b"y")
    assert protected_in_tree(str(tmp_path), ["/usr/lib/os-release"], HIERARCHIES) == (
        f"its opaque directory /usr/lib hides the protected path /usr/lib/os-release; {HINT}"
    )
    os.setxattr(tmp_path / "usr/lib", "trusted.overlay.opaque", b"x")  # xattr whiteouts: merges
    assert protected_in_tree(str(tmp_path), ["/usr/lib/os-release"], HIERARCHIES) is None
    os.mkfifo(tmp_path / "usr/lib/os-release")
    assert "protected path /usr/lib/os-release" in (
        protected_in_tree(str(tmp_path), ["/usr/lib/os-release"], HIERARCHIES) or ""
    )


def test_on_a_tree_a_hierarchy_that_is_a_symlink_provides_nothing(tmp_path: Path) -> None:
    (tmp_path / "real/passwd").parent.mkdir()
    (tmp_path / "real/passwd").write_text("x")
    (tmp_path / "etc").symlink_to("real")
    assert protected_in_tree(str(tmp_path), ["/etc/passwd"], HIERARCHIES) is None
