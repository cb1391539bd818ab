from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core.model import OsRelease
from personalityd.core.osrelease import base_os_release, parse_os_release, systemd_architecture


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ID=debian", {"ID": "debian"}),
        ('NAME="Debian GNU/Linux"', {"NAME": "Debian GNU/Linux"}),
        ("NAME='Fedora Linux'", {"NAME": "Fedora Linux"}),
        ('X="a \\"quoted\\" \\$HOME \\`cmd\\` \\\\ end"', {"X": 'a "quoted" $HOME `cmd` \\ end'}),
        ('X="keeps \\n and \\a"', {"X": "keeps \\n and \\a"}),
        ("X='no \\escapes \"here\"'", {"X": 'no \\escapes "here"'}),
        ("X=unquoted\\ space", {"X": "unquoted space"}),
        ("X=trailing   ", {"X": "trailing"}),
        ("X=  leading", {"X": "leading"}),
        ('X="  kept  "  ', {"X": "  kept  "}),
        ("X=a b c", {"X": "a b c"}),
        ("X=\"a\"'b'c", {"X": "abc"}),
        ("X=", {"X": ""}),
        ('X=""', {"X": ""}),
        ("X=a=b", {"X": "a=b"}),
        ("# a comment\n\n   \nID=arch\n", {"ID": "arch"}),
        ("  # indented comment\nID=arch", {"ID": "arch"}),
        ("ID=one\nID=two", {"ID": "two"}),
        ("ID=debian\r\nVERSION_ID=12\r\n", {"ID": "debian", "VERSION_ID": "12"}),
        ("  ID = debian", {"ID": "debian"}),
        ("_UNDER_9=x", {"_UNDER_9": "x"}),
        # Malformed lines are ignored; the rest is kept.
        ("no equals sign\nID=ok", {"ID": "ok"}),
        ("9KEY=x\nID=ok", {"ID": "ok"}),
        ("KEY-DASH=x\nID=ok", {"ID": "ok"}),
        ("=value\nID=ok", {"ID": "ok"}),
        ('X="unterminated\nID=ok', {"ID": "ok"}),
        ("X='unterminated\nID=ok", {"ID": "ok"}),
        ('X="ends in backslash\\\nID=ok', {"ID": "ok"}),
        ("", {}),
    ],
)
def test_parse_os_release(text: str, expected: dict[str, str]) -> None:
    assert parse_os_release(text) == expected


def test_parse_real_os_release() -> None:
    text = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
    fields = parse_os_release(text)
    assert fields["ID"] == "debian"
    assert fields["VERSION_ID"] == "12"
    assert fields["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert fields["HOME_URL"] == "https://www.debian.org/"


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "x86-64"),
        ("aarch64", "arm64"),
        ("i686", "x86"),
        ("i386", "x86"),
        ("armv7l", "arm"),
        ("ppc64le", "ppc64-le"),
        ("s390x", "s390x"),
        ("riscv64", "riscv64"),
        ("loongarch64", "loongarch64"),
        ("weird9000", "weird9000"),
    ],
)
def test_systemd_architecture(machine: str, expected: str) -> None:
    assert systemd_architecture(machine) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"ID": "ubuntu", "ID_LIKE": "debian  ", "VERSION_ID": "24.04"},
            OsRelease("ubuntu", ("debian",), "24.04", None, "x86-64"),
        ),
        (
            {"ID": "rocky", "ID_LIKE": "rhel centos fedora", "SYSEXT_LEVEL": "1.0"},
            OsRelease("rocky", ("rhel", "centos", "fedora"), None, "1.0", "x86-64"),
        ),
        ({"ID": "arch", "VERSION_ID": ""}, OsRelease("arch", (), None, None, "x86-64")),
        ({}, OsRelease("linux", (), None, None, "x86-64")),
    ],
)
def test_base_os_release(fields: dict[str, str], expected: OsRelease) -> None:
    assert base_os_release(fields, "x86-64") == expected


KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
# Values on one line: anything but line breaks (os-release has one assignment per line).
VALUES = st.text(st.characters(exclude_characters="\n\r", codec="utf-8"))


def _double_quoted(value: str) -> str:
    escaped = "".join("\\" + c if c in '"\\`$' else c for c in value)
    return f'"{escaped}"'


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_double_quoted_values_round_trip(fields: dict[str, str]) -> None:
    text = "".join(f"{key}={_double_quoted(value)}\n" for key, value in fields.items())
    assert parse_os_release(text) == fields


@given(st.dictionaries(KEYS, VALUES.filter(lambda v: "'" not in v), max_size=8))
def test_single_quoted_values_round_trip(fields: dict[str, str]) -> None:
    text = "# written by a test\n" + "".join(f"{k}='{v}'\n" for k, v in fields.items())
    assert parse_os_release(text) == fields


@given(st.text())
def test_parse_never_raises(text: str) -> None:
    fields = parse_os_release(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())


@given(st.lists(st.sampled_from(["ID", "=", "'", '"', "\\", "\n", " ", "#", "x", "$"])))
def test_parse_never_raises_on_syntax_soup(parts: list[str]) -> None:
    parse_os_release("".join(parts))
