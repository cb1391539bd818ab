"""The name a spool request is filed under: its own, or a shortened one that still fits."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from personalityd.adapters.spool import MAX_STEM_BYTES, NAME_MAX, SpoolFile


def test_a_name_that_fits_is_kept() -> None:
    stem = "x" * MAX_STEM_BYTES
    spool_file = SpoolFile.of(Path(f"/spool/{stem}.json"))
    assert not spool_file.shortened
    assert spool_file.result_name == f"{stem}.result.json"


def test_long_names_sharing_a_beginning_are_filed_apart() -> None:
    first = SpoolFile.of(Path("/spool/" + "a" * 240 + "1.json"))
    second = SpoolFile.of(Path("/spool/" + "a" * 240 + "2.json"))
    assert first.shortened and second.shortened
    assert first.result_name != second.result_name


@given(st.text(min_size=1, max_size=250).filter(lambda s: "/" not in s and "\0" not in s))
def test_every_filed_name_and_its_temporary_fit(stem: str) -> None:
    if len(os.fsencode(stem + ".json")) > NAME_MAX:
        return  # no such request file can exist
    spool_file = SpoolFile.of(Path(f"/spool/{stem}.json"))
    temporary = f".{spool_file.result_name}.XXXXXXXX.tmp"
    assert len(os.fsencode(temporary)) <= NAME_MAX
    assert len(os.fsencode(spool_file.filed_name)) <= NAME_MAX
    assert spool_file.shortened == (len(os.fsencode(stem)) > MAX_STEM_BYTES)


def test_undecodable_bytes_are_cut_whole() -> None:
    stem = os.fsdecode(b"\xff" * 240)
    spool_file = SpoolFile.of(Path(f"/spool/{stem}.json"))
    assert len(os.fsencode(spool_file.filed_stem)) <= MAX_STEM_BYTES
