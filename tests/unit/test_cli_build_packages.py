"""personalityctl build --packages: the command line (the builds themselves run as system
tests, tests/system/test_build_packages.py)."""

from __future__ import annotations

import pytest

from personalityd.client import cli


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "dir", "--packages", "x", "--name", "n", "-o", "o"], "takes no DIR"),
        (["build", "--name", "n", "-o", "o"], "build needs DIR, or --packages"),
        (["build", "dir", "--base", "/", "--name", "n", "-o", "o"], "--base is for build"),
        (["build", "dir", "--tree", "t", "--name", "n", "-o", "o"], "--tree is for build"),
        (
            ["build", "--packages", "x", "--services", "a.service", "--name", "n", "-o", "o"],
            "--services is not for build --packages",
        ),
        (
            ["build", "--packages", "x", "--id", "debian", "--name", "n", "-o", "o"],
            "--id is not for build --packages",
        ),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_base_without_apt_is_one_line(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "build",
        "--packages",
        "x",
        "--name",
        "n",
        "-o",
        f"{tmp_path}/o",
        "--base",
        f"{tmp_path}",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no apt-get and dpkg there" in err


def test_invalid_name_is_refused_before_anything(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--packages", "x", "--name", "bad/name", "-o", f"{tmp_path}/o"]
    assert cli.main(argv) == 1
    assert "bad/name" in capsys.readouterr().err
