"""core/imagenames.py: which directory entries are personalities, under which name, and which
one wins when one directory offers a name twice."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core.imagenames import (
    FILE_SUFFIXES,
    Candidate,
    Listed,
    ListedKind,
    absorbed_targets,
    entry_name,
    listed_name,
    same_directory_target,
    select_entries,
)
from personalityd.core.names import is_valid_name


@pytest.mark.parametrize(
    ("filename", "is_dir", "expected"),
    [
        ("web.raw", False, "web"),
        ("web.sysext.raw", False, "web"),
        ("web.squashfs", False, "web"),
        ("web.erofs", False, "web"),
        ("web.img", False, "web"),
        ("web_1.2.raw", False, "web_1.2"),
        ("base-tools.raw", False, "base-tools"),
        ("web", True, "web"),
        ("web.d", True, "web.d"),
        ("sysext.raw", False, "sysext"),
        ("web.sysext.squashfs", False, "web.sysext"),
        # Not entries.
        ("web", False, None),
        ("web.raw", True, None),
        ("web.squashfs", True, None),
        (".web.raw", False, None),
        (".#web.raw", False, None),
        (".web", True, None),
        ("web.raw.tmp", False, None),
        ("web.raw~", False, None),
        ("web.RAW", False, None),
        ("web.sysext", False, None),
        (".raw", False, None),
        (".sysext.raw", False, None),
        ("-web.raw", False, None),
        ("we b.raw", False, None),
        ("web~", True, None),
        ("x" * 64 + ".raw", False, "x" * 64),
        ("x" * 65 + ".raw", False, None),
        ("x" * 65, True, None),
        ("SHA256SUMS", False, None),
        ("SHA256SUMS.gpg", False, None),
    ],
)
def test_entry_name(filename: str, is_dir: bool, expected: str | None) -> None:
    assert entry_name(filename, is_dir) == expected


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
FILENAMES = st.text(
    alphabet=st.sampled_from("abcAB019_.-~# /"), min_size=0, max_size=80
) | NAMES.flatmap(lambda n: st.sampled_from(FILE_SUFFIXES).map(lambda s: n + s))


@given(NAMES, st.sampled_from(FILE_SUFFIXES))
def test_every_valid_name_with_a_suffix_is_found(name: str, suffix: str) -> None:
    found = entry_name(name + suffix, is_dir=False)
    if name.endswith(".sysext") and suffix == ".raw":
        assert found == name[: -len(".sysext")] or found is None
    else:
        assert found == name
    assert entry_name(name, is_dir=True) == (
        None if any(name.endswith(s) for s in FILE_SUFFIXES) else name
    )


@given(FILENAMES, st.booleans())
def test_an_entry_name_is_a_valid_name_the_filename_spells(filename: str, is_dir: bool) -> None:
    name = entry_name(filename, is_dir)
    if name is None:
        return
    assert is_valid_name(name)
    assert not filename.startswith(".")
    if is_dir:
        assert filename == name
    else:
        assert filename[len(name) :] in FILE_SUFFIXES
        assert filename.startswith(name)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("web_1.2.raw", "web_1.2.raw"),
        ("./web_1.2.raw", "web_1.2.raw"),
        ("././web_1.2.raw", "web_1.2.raw"),
        (".//web_1.2.raw", "web_1.2.raw"),
        ("/var/lib/personalities/web_1.2.raw", None),
        ("../personalities/web_1.2.raw", None),
        ("sub/web.raw", None),
        ("web.raw/", None),
        ("..", None),
        (".", None),
        ("./", None),
        ("", None),
    ],
)
def test_same_directory_target(target: str, expected: str | None) -> None:
    assert same_directory_target(target) == expected


def file(name: str) -> Listed:
    return Listed(name, "file")


def link(name: str, target: str) -> Listed:
    return Listed(name, "symlink", target)


def directory(name: str) -> Listed:
    return Listed(name, "dir")


def test_select_entries_names_sorted_and_not_entries_left_out() -> None:
    listing = [
        file("web.raw"),
        file("db.squashfs"),
        directory("dev-tree"),
        file(".web.raw.partial"),
        file("notes.txt"),
        file("SHA256SUMS"),
        directory("subdir.raw"),
        Listed("pipe.raw", "other"),
    ]
    assert select_entries(listing) == [
        Candidate("db", file("db.squashfs")),
        Candidate("dev-tree", directory("dev-tree")),
        Candidate("pipe", Listed("pipe.raw", "other")),
        Candidate("web", file("web.raw")),
    ]


def test_sysupdate_symlink_absorbs_its_target() -> None:
    listing = [
        link("web.raw", "web_1.2.raw"),
        file("web_1.2.raw"),
        file("web_1.1.raw"),  # an older version beside the link: web's, no entry of its own
        file("web_tools.raw"),  # not a version (no digit after the `_`): an entry
        file("web_2.squashfs"),  # another suffix than the link's: an entry
        link("db.raw", "./db_7.raw"),
        file("db_7.raw"),
    ]
    assert select_entries(listing) == [
        Candidate("db", link("db.raw", "./db_7.raw")),
        Candidate("web", link("web.raw", "web_1.2.raw")),
        Candidate("web_2", file("web_2.squashfs")),
        Candidate("web_tools", file("web_tools.raw")),
    ]


def test_symlinks_that_do_not_absorb() -> None:
    listing = [
        # Points elsewhere: its target in this directory keeps its own entry.
        link("web.raw", "/var/lib/personalities/web_1.2.raw"),
        file("web_1.2.raw"),
        # Not an entry itself (no suffix), so not a sysupdate link either.
        link("current", "db_3.raw"),
        file("db_3.raw"),
        # Dangling: still listed, it is refused when opened.
        link("gone.raw", "gone_1.raw"),
    ]
    assert [c.name for c in select_entries(listing)] == ["db_3", "gone", "web", "web_1.2"]


def test_chains_absorb_every_link_after_the_first() -> None:
    listing = [
        link("web.raw", "web-current.raw"),
        link("web-current.raw", "web_2.raw"),
        file("web_2.raw"),
    ]
    assert select_entries(listing) == [Candidate("web", link("web.raw", "web-current.raw"))]


def test_symlink_circles_are_kept_to_be_refused() -> None:
    listing = [
        link("a.raw", "b.raw"),
        link("b.raw", "a.raw"),
        link("self.raw", "self.raw"),
        link("c.raw", "a.raw"),
    ]
    assert absorbed_targets(listing) == set()
    assert [c.name for c in select_entries(listing)] == ["a", "b", "c", "self"]


def test_same_name_twice_in_one_directory_follows_systemd_order() -> None:
    listing = [
        file("web.img"),
        file("web.erofs"),
        file("web.squashfs"),
        file("web.raw"),
        link("web.sysext.raw", "web_3.raw"),
        file("web_3.raw"),
        directory("web"),
    ]
    [candidate] = select_entries(listing)
    assert candidate.name == "web"
    assert candidate.entry == directory("web")
    assert [item.filename for item in candidate.shadowed] == [
        "web.sysext.raw",
        "web.raw",
        "web.squashfs",
        "web.erofs",
        "web.img",
    ]
    assert candidate.options == (candidate.entry, *candidate.shadowed)


def test_raw_beats_squashfs() -> None:
    assert select_entries([file("web.squashfs"), file("web.raw")]) == [
        Candidate("web", file("web.raw"), (file("web.squashfs"),))
    ]


KINDS: list[ListedKind] = ["file", "dir", "symlink", "other"]
STEMS = st.sampled_from(["web", "db", "web_1", "web_2", "x.y", "-bad", ".hidden"])
LISTED_NAMES = st.tuples(STEMS, st.sampled_from(["", *FILE_SUFFIXES, ".tmp", "~"])).map(
    lambda parts: parts[0] + parts[1]
)


@st.composite
def listings(draw: st.DrawFn) -> list[Listed]:
    filenames = draw(st.lists(LISTED_NAMES, unique=True, max_size=12))
    listing = []
    for filename in filenames:
        kind = draw(st.sampled_from(KINDS))
        target = None
        if kind == "symlink":
            prefix = draw(st.sampled_from(["", "./"]))
            target = draw(
                st.sampled_from([prefix + name for name in filenames])
                | LISTED_NAMES
                | st.just("/elsewhere/web.raw")
            )
        listing.append(Listed(filename, kind, target))
    return listing


def _is_version_beside(filename: str, link: str, name: str) -> bool:
    suffix = link[len(name) :]
    version = filename.removeprefix(name + "_")
    return filename.endswith(suffix) and version != filename and version[:1].isdigit()


@given(listings(), st.randoms())
def test_select_entries_properties(listing: list[Listed], random: Random) -> None:
    candidates = select_entries(listing)
    names = [c.name for c in candidates]
    assert names == sorted(set(names)), "one candidate per name, sorted"
    absorbed = absorbed_targets(listing)
    offered = [item for c in candidates for item in c.options]
    assert len(offered) == len(set(offered))
    for c in candidates:
        for item in c.options:
            assert item in listing
            assert listed_name(item) == c.name
    # Every entry is offered exactly once, unless it is a symlink entry's content.
    for item in listing:
        is_entry = listed_name(item) is not None
        assert (item in offered) == (is_entry and item.filename not in absorbed)
    # An absorbed name is the same-directory target of another symlink entry, or a version
    # beside a symlink entry (`web_1.raw` beside `web.raw -> ...`, systemd-sysupdate's layout).
    for filename in absorbed:
        assert any(
            item.kind == "symlink"
            and item.filename != filename
            and (name := listed_name(item)) is not None
            and item.link_target is not None
            and (
                same_directory_target(item.link_target) == filename
                or _is_version_beside(filename, item.filename, name)
            )
            for item in listing
        )
    # The order of the listing does not matter.
    shuffled = list(listing)
    random.shuffle(shuffled)
    assert select_entries(shuffled) == candidates
