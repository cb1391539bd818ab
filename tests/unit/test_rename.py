"""adapters/rename.py: renames below a top directory that follow no symlink and never replace."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from personalityd.adapters.rename import rename_beneath


def test_moves_a_tree_between_tops(tmp_path: Path) -> None:
    (tmp_path / "upper/a/b").mkdir(parents=True)
    (tmp_path / "upper/a/b/f").write_text("x")
    (tmp_path / "aside/1").mkdir(parents=True)
    rename_beneath(str(tmp_path / "upper"), "a/b", str(tmp_path / "aside"), "1/b")
    assert (tmp_path / "aside/1/b/f").read_text() == "x"
    assert not (tmp_path / "upper/a/b").exists()


def test_a_symlink_on_the_way_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere/b").mkdir(parents=True)
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper/a").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "aside").mkdir()
    with pytest.raises(OSError) as exc:
        rename_beneath(str(tmp_path / "upper"), "a/b", str(tmp_path / "aside"), "b")
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (tmp_path / "elsewhere/b").is_dir()
    assert not (tmp_path / "aside/b").exists()


def test_nothing_is_replaced(tmp_path: Path) -> None:
    for top in ("upper", "aside"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "f").write_text(top)
    with pytest.raises(OSError) as exc:
        rename_beneath(str(tmp_path / "upper"), "f", str(tmp_path / "aside"), "f")
    assert exc.value.errno == errno.EEXIST
    assert (tmp_path / "upper/f").read_text() == "upper"
    assert (tmp_path / "aside/f").read_text() == "aside"


@pytest.mark.parametrize("rel", ["", "../x", "a/../b", "/"])
def test_only_relative_paths_below_the_top(tmp_path: Path, rel: str) -> None:
    with pytest.raises(OSError):
        rename_beneath(str(tmp_path), rel, str(tmp_path), "t")
