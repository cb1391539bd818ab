"""stack/orphans.py on a plain directory tree: moving orphans aside and putting them back."""

from __future__ import annotations

from pathlib import Path

from personalityd.core.orphans import Orphan
from personalityd.stack.layout import Upper
from personalityd.stack.orphans import move_aside, put_back, written_again

REL = "lib/python3/dist-packages/numpy"


def _volume(tmp_path: Path) -> tuple[Upper, Path]:
    pyc = tmp_path / "upper/_usr" / REL / "__pycache__/x.pyc"
    pyc.parent.mkdir(parents=True)
    pyc.write_bytes(b"compiled")
    return Upper("volume", str(tmp_path), "/dev/test"), pyc


def test_moved_to_orphans_of_the_generation_and_put_back_on_undo(tmp_path: Path) -> None:
    upper, pyc = _volume(tmp_path)
    orphan = Orphan("/usr", REL.encode(), "numpy")

    (moved,) = move_aside(upper, 7, [orphan])

    assert moved.on_volume == f"orphans/7/_usr/{REL}"
    assert (tmp_path / moved.on_volume / "__pycache__/x.pyc").read_bytes() == b"compiled"
    assert not pyc.exists()
    assert (tmp_path / "orphans").stat().st_mode & 0o777 == 0o700
    assert written_again([moved]) == []

    put_back([moved])

    assert pyc.read_bytes() == b"compiled"
    assert list((tmp_path / "orphans").iterdir()) == []  # the directories it made are gone


def test_a_path_written_again_after_the_move_is_reported(tmp_path: Path) -> None:
    upper, pyc = _volume(tmp_path)
    (moved,) = move_aside(upper, 3, [Orphan("/usr", REL.encode(), "numpy")])
    pyc.parent.mkdir(parents=True)
    assert written_again([moved]) == [moved]


def test_what_cannot_be_moved_stays_in_place(tmp_path: Path) -> None:
    upper, pyc = _volume(tmp_path)
    taken = tmp_path / "orphans/7/_usr" / REL
    taken.mkdir(parents=True)
    (taken / "earlier").write_text("kept too")

    assert move_aside(upper, 7, [Orphan("/usr", REL.encode(), "numpy")]) == []

    assert pyc.read_bytes() == b"compiled"
    assert (taken / "earlier").read_text() == "kept too"


def test_nothing_moves_without_an_upper(tmp_path: Path) -> None:
    assert move_aside(Upper("none", None, ""), 1, [Orphan("/usr", b"x", "n")]) == []
