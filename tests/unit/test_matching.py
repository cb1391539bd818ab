from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from personalityd.core.matching import (
    DEFAULT_VOLUME_RULES,
    DEFAULT_WRITABLE_RULES,
    matched_only_by_fs_type,
    matches_any,
)


@pytest.mark.parametrize(
    ("properties", "matches", "only_fs_type"),
    [
        ({"ID_FS_TYPE": "squashfs"}, True, True),
        ({"ID_FS_TYPE": "erofs"}, True, True),
        ({"ID_FS_TYPE": "ext4"}, False, False),
        ({"ID_FS_TYPE": "ext4", "ID_FS_LABEL": "personality-web"}, True, False),
        ({"ID_FS_TYPE": "squashfs", "ID_FS_LABEL": "personality-web"}, True, False),
        ({"ID_FS_LABEL": "personality-"}, True, False),
        ({"ID_FS_LABEL": "Personality-web"}, False, False),  # globs are case sensitive
        ({"ID_FS_LABEL": "my-personality-web"}, False, False),
        ({"ID_PART_ENTRY_NAME": "personality-db"}, True, False),
        ({"PERSONALITYD_VOLUME": "1"}, True, False),
        ({"PERSONALITYD_VOLUME": "0"}, False, False),
        ({"PERSONALITYD_VOLUME": "10"}, False, False),
        ({}, False, False),
    ],
)
def test_default_volume_rules(
    properties: dict[str, str], matches: bool, only_fs_type: bool
) -> None:
    assert matches_any(DEFAULT_VOLUME_RULES, properties) is matches
    assert matched_only_by_fs_type(DEFAULT_VOLUME_RULES, properties) is only_fs_type


@pytest.mark.parametrize(
    ("properties", "matches"),
    [
        ({"ID_FS_LABEL": "personality-data"}, True),
        ({"ID_FS_LABEL": "personality-data2"}, False),
        ({"ID_FS_TYPE": "ext4"}, False),
    ],
)
def test_default_writable_rules(properties: dict[str, str], matches: bool) -> None:
    assert matches_any(DEFAULT_WRITABLE_RULES, properties) is matches


@pytest.mark.parametrize(
    ("rules", "properties", "matches"),
    [
        # every key of a table must match
        ([{"A": "x", "B": "y*"}], {"A": "x", "B": "yes"}, True),
        ([{"A": "x", "B": "y*"}], {"A": "x"}, False),
        ([{"A": "x", "B": "y*"}], {"A": "x", "B": "no"}, False),
        # one table is enough
        ([{"A": "1"}, {"B": "2"}], {"B": "2"}, True),
        # shell globs
        ([{"A": "sd[a-c]"}], {"A": "sdb"}, True),
        ([{"A": "sd[a-c]"}], {"A": "sdd"}, False),
        ([{"A": "?"}], {"A": "x"}, True),
        ([{"A": "?"}], {"A": ""}, False),
        ([{"A": "*"}], {"A": ""}, True),
        ([{"A": "*"}], {}, False),  # a missing property never matches
        ([{}], {"A": "x"}, False),  # an empty table matches nothing
        ([], {"A": "x"}, False),
    ],
)
def test_matches_any(
    rules: Sequence[Mapping[str, str]], properties: dict[str, str], matches: bool
) -> None:
    assert matches_any(rules, properties) is matches


@pytest.mark.parametrize(
    ("rules", "properties", "expected"),
    [
        ([{"ID_FS_TYPE": "squashfs"}], {"ID_FS_TYPE": "squashfs"}, True),
        # a rule keyed on ID_FS_TYPE and something else is not "only the fs type"
        ([{"ID_FS_TYPE": "squashfs", "X": "1"}], {"ID_FS_TYPE": "squashfs", "X": "1"}, False),
        (
            [{"ID_FS_TYPE": "squashfs"}, {"X": "1"}],
            {"ID_FS_TYPE": "squashfs", "X": "1"},
            False,
        ),
        ([{"ID_FS_TYPE": "squashfs"}, {"X": "1"}], {"ID_FS_TYPE": "squashfs"}, True),
        ([{"X": "1"}], {"ID_FS_TYPE": "squashfs"}, False),
    ],
)
def test_matched_only_by_fs_type(
    rules: Sequence[Mapping[str, str]], properties: dict[str, str], expected: bool
) -> None:
    assert matched_only_by_fs_type(rules, properties) is expected
