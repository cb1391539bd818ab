"""core.snapshots: the names of the upper's subvolumes, and which of them a prune deletes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core import snapshots as s

generations = st.integers(min_value=0, max_value=10**12)
suffixes = st.integers(min_value=0, max_value=50)
# Names as a directory may hold them: ours, near misses, and anything else.
any_names = st.one_of(
    generations.map(str),
    st.builds(s.suffixed_name, generations, suffixes),
    generations.map(s.temp_name),
    st.sampled_from(["01", "-1", "+1", "1.0", "1.01", "1.", ".1", "1.2.3", "x", " 1", "1 ", "٣"]),
    st.text(min_size=1, max_size=8),
)


@pytest.mark.parametrize(
    "name, expected",
    [("0", 0), ("7", 7), ("123", 123), ("007", None), ("-1", None), ("+1", None), ("1.1", None),
     ("", None), ("x", None), ("٣", None), (".new-3", None), ("3\n", None)],
)  # fmt: skip
def test_parse_generation(name: str, expected: int | None) -> None:
    assert s.parse_generation(name) == expected


@pytest.mark.parametrize(
    "name, expected",
    [("4", (4, 0)), ("4.1", (4, 1)), ("4.12", (4, 12)), ("4.0", None), ("4.01", None),
     ("04.1", None), ("4.", None), (".1", None), ("4.1.1", None), ("a.1", None)],
)  # fmt: skip
def test_parse_suffixed(name: str, expected: tuple[int, int] | None) -> None:
    assert s.parse_suffixed(name) == expected


@given(generations, suffixes)
def test_suffixed_names_round_trip(generation: int, suffix: int) -> None:
    name = s.suffixed_name(generation, suffix)
    assert s.parse_suffixed(name) == (generation, suffix)
    assert (s.parse_generation(name) is not None) == (suffix == 0)


@given(st.lists(any_names))
def test_parsed_names_are_canonical(existing: list[str]) -> None:
    """One name for each number: a parsed name formats back to itself."""
    for name in existing:
        if (g := s.parse_generation(name)) is not None:
            assert s.generation_name(g) == name
        if (parsed := s.parse_suffixed(name)) is not None:
            assert s.suffixed_name(*parsed) == name


def test_negative_generation_refused() -> None:
    with pytest.raises(ValueError):
        s.generation_name(-1)


def test_next_free_name() -> None:
    assert s.next_free_name(5, set()) == "5"
    assert s.next_free_name(5, {"5"}) == "5.1"
    assert s.next_free_name(5, {"5", "5.1", "5.3"}) == "5.2"
    assert s.next_free_name(5, {"6", "5.1"}) == "5"


@given(generations, st.sets(any_names))
def test_next_free_name_is_free_and_ours(generation: int, existing: set[str]) -> None:
    name = s.next_free_name(generation, existing)
    assert name not in existing
    parsed = s.parse_suffixed(name)
    assert parsed is not None and parsed[0] == generation
    # the smallest free suffix
    assert all(s.suffixed_name(generation, n) in existing for n in range(parsed[1]))


def test_temp_names() -> None:
    assert s.temp_name(3) == ".new-3"
    assert s.is_temp_name(".new-3")
    assert not s.is_temp_name(".new-03")
    assert not s.is_temp_name(".new-")
    assert not s.is_temp_name("3")
    assert s.parse_generation(s.temp_name(3)) is None


def test_snapshots_to_prune() -> None:
    existing = ["1", "2", "3", "10", ".new-4", "notes", "02", "3.1"]
    assert s.snapshots_to_prune(existing, {2, 3}) == [".new-4", "1", "10"]
    assert s.snapshots_to_prune(existing, set()) == [".new-4", "1", "10", "2", "3"]


@given(st.lists(any_names, unique=True), st.sets(generations))
def test_snapshots_to_prune_rule(existing: list[str], keep: set[int]) -> None:
    doomed = s.snapshots_to_prune(existing, keep)
    assert doomed == sorted(doomed)
    for name in existing:
        g = s.parse_generation(name)
        expected = (g is not None and g not in keep) or s.is_temp_name(name)
        assert (name in doomed) == expected


def test_lives_to_prune() -> None:
    assert s.lives_to_prune(["0", "4", "4.1", "x", "05"], "4") == ["0", "4.1"]
    assert s.lives_to_prune(["4"], "4") == []


@given(st.lists(any_names, unique=True), st.builds(s.suffixed_name, generations, suffixes))
def test_lives_to_prune_keeps_the_live_one_and_foreign_names(
    existing: list[str], live: str
) -> None:
    doomed = s.lives_to_prune([*existing, live], live)
    assert live not in doomed
    assert set(doomed) == {n for n in existing if n != live and s.parse_suffixed(n) is not None}


def test_choose_live() -> None:
    assert s.choose_live([]) is None
    assert s.choose_live(["x", "07"]) is None
    assert s.choose_live(["3"]) == "3"
    assert s.choose_live(["3", "10", "9.4"]) == "10"
    assert s.choose_live(["10", "10.2", "10.10", "x"]) == "10.10"
