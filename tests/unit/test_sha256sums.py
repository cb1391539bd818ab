"""core/sha256sums.py: the SHA256SUMS syntax systemd-sysupdate reads, plus GNU's escapes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core.sha256sums import (
    Sha256SumsError,
    expected_digest,
    format_sha256sums,
    parse_sha256sums,
)

A = "a" * 64
B = "0123456789abcdef" * 4
UPPER = "0123456789ABCDEF" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", {}),
        (f"{A}  web.raw\n".encode(), {"web.raw": A}),
        (f"{A} *web.raw\n".encode(), {"web.raw": A}),
        (f"{UPPER}  web.raw\n".encode(), {"web.raw": UPPER.lower()}),
        (f"{A}  web.raw\n{B}  db.raw\n".encode(), {"web.raw": A, "db.raw": B}),
        # The same name with the same digest twice is harmless.
        (f"{A}  web.raw\n{A} *web.raw\n".encode(), {"web.raw": A}),
        # Relative subpaths are names (sysupdate matches them against its patterns).
        (f"{A}  sub/web.raw\n".encode(), {"sub/web.raw": A}),
        # The rest of the line is the name, spaces and all.
        (f"{A}   lead\n".encode(), {" lead": A}),
        (f"{A}  trail \n".encode(), {"trail ": A}),
        (f"{A}  two  spaces\n".encode(), {"two  spaces": A}),
        (f"{A}  web*.raw\n".encode(), {"web*.raw": A}),
        (f"{A}  pers\u00f6nlichkeit.raw\n".encode(), {"pers\u00f6nlichkeit.raw": A}),
        # Without a leading backslash a backslash is literal (as in coreutils).
        (f"{A}  a\\nb\n".encode(), {"a\\nb": A}),
        # GNU sha256sum's escaped lines.
        (f"\\{A}  a\\\\b\n".encode(), {"a\\b": A}),
        (f"\\{A}  a\\nb\n".encode(), {"a\nb": A}),
        (f"\\{A}  a\\rb\n".encode(), {"a\rb": A}),
        (f"\\{A} *plain\n".encode(), {"plain": A}),
        (f"\\{A}  \\n\n".encode(), {"\n": A}),
        # sysupdate's "best before" marker is a line like any other here.
        (f"{A}  BEST-BEFORE-2030-01-01\n".encode(), {"BEST-BEFORE-2030-01-01": A}),
    ],
)
def test_parse(text: bytes, expected: dict[str, str]) -> None:
    assert parse_sha256sums(text) == expected


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (b"\n", 1, "empty line"),
        (f"{A}  web.raw\n\n".encode(), 2, "empty line"),
        (f"{A}  web.raw".encode(), 1, "no newline at the end"),
        (f"{A}  web.raw\n{B}  db.raw".encode(), 2, "no newline at the end"),
        (f"SHA256 (web.raw) = {A}\n".encode(), 1, "BSD-style line"),
        (f"SHA2-256(web.raw)= {A}\n".encode(), 1, "BSD-style line"),
        (f"{A}  ok.raw\n# comment\n".encode(), 2, "no SHA-256 digest"),
        (f"{A[:63]}  web.raw\n".encode(), 1, "no SHA-256 digest"),
        (f"{A}0  web.raw\n".encode(), 1, "the digest must be followed by two spaces"),
        (("a" * 128 + "  web.raw\n").encode(), 1, "the digest must be followed by two spaces"),
        (f"{'g' * 64}  web.raw\n".encode(), 1, "no SHA-256 digest"),
        (f" {A}  web.raw\n".encode(), 1, "no SHA-256 digest"),
        # systemd-importd's one-space form (linuxcontainers.org) is not sysupdate's.
        (f"{A} web.raw\n".encode(), 1, "two spaces"),
        (f"{A}\tweb.raw\n".encode(), 1, "two spaces"),
        (f"{A}  \n".encode(), 1, "the name is empty"),
        (f"{A}  /abs/web.raw\n".encode(), 1, "absolute path"),
        (f"{A}  ./web.raw\n".encode(), 1, "not a normalized relative path"),
        (f"{A}  a/../web.raw\n".encode(), 1, "not a normalized relative path"),
        (f"{A}  a//web.raw\n".encode(), 1, "not a normalized relative path"),
        (f"{A}  dir/\n".encode(), 1, "not a normalized relative path"),
        (f"{A}  ..\n".encode(), 1, "not a normalized relative path"),
        (f"{A}  web.raw\r\n".encode(), 1, "carriage return"),
        (f"{A}  we\tb.raw\n".encode(), 1, "control character"),
        (f"{A}  we\x00b.raw\n".encode(), 1, "control character"),
        (f"{A}  we\x7fb.raw\n".encode(), 1, "control character"),
        (f"{A}  web\xff.raw\n".encode("latin-1"), 1, "not valid UTF-8"),
        (f"\\{A}  a\\tb\n".encode(), 1, "unknown escape '\\t'"),
        (f"\\{A}  ab\\\n".encode(), 1, "lone backslash"),
        (f"{A}  web.raw\n{B}  web.raw\n".encode(), 2, "listed again with another digest"),
    ],
)
def test_malformed_lines_name_the_line(text: bytes, line: int, words: str) -> None:
    with pytest.raises(Sha256SumsError) as raised:
        parse_sha256sums(text)
    assert raised.value.line == line
    assert str(raised.value).startswith(f"line {line}: ")
    assert words in str(raised.value)


def test_duplicate_message_names_both_lines() -> None:
    text = f"{A}  web.raw\n{B}  db.raw\n{B}  web.raw\n".encode()
    with pytest.raises(Sha256SumsError) as raised:
        parse_sha256sums(text)
    assert str(raised.value) == (
        "line 3: 'web.raw' is listed again with another digest "
        f"(line 1 has {A[:12]}…, this one {B[:12]}…)"
    )


def test_one_bad_line_refuses_the_whole_listing() -> None:
    with pytest.raises(Sha256SumsError, match=r"^line 2: "):
        parse_sha256sums(f"{A}  web.raw\nnonsense\n{B}  db.raw\n".encode())


def test_expected_digest_takes_the_first_listed_name() -> None:
    listing = {"web.raw": A, "web_1.2.raw": B}
    assert expected_digest(listing, ["web.raw", "web_1.2.raw"]) == A
    assert expected_digest(listing, ["web_1.2.raw", "web.raw"]) == B
    assert expected_digest(listing, ["other.raw", "web_1.2.raw"]) == B
    assert expected_digest(listing, ["other.raw"]) is None
    assert expected_digest(listing, []) is None
    assert expected_digest({}, ["web.raw"]) is None


def test_format_like_sha256sum() -> None:
    assert format_sha256sums({"web.raw": A}) == f"{A}  web.raw\n".encode()
    assert format_sha256sums({"web.raw": A}, binary=True) == f"{A} *web.raw\n".encode()
    assert format_sha256sums({"a\\b": UPPER}) == f"\\{UPPER.lower()}  a\\\\b\n".encode()
    assert format_sha256sums({"a\nb\rc": A}) == f"\\{A}  a\\nb\\rc\n".encode()
    assert format_sha256sums({}) == b""
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        format_sha256sums({"web.raw": "abc"})


_COMPONENT = st.text(
    # Any character but the surrogates (not UTF-8) and the control characters sha256sum
    # writes raw (it escapes only \n and \r, and the backslash).
    alphabet=st.characters(
        exclude_categories=["Cs"],
        exclude_characters="/\x00",
    ).filter(lambda char: char in "\n\r" or not (char < " " or char == "\x7f")),
    min_size=1,
    max_size=12,
).filter(lambda part: part not in (".", ".."))
_NAMES = st.lists(_COMPONENT, min_size=1, max_size=3).map("/".join)
_DIGESTS = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)


@given(st.dictionaries(_NAMES, _DIGESTS, max_size=8), st.booleans())
def test_format_then_parse_round_trips(entries: dict[str, str], binary: bool) -> None:
    parsed = parse_sha256sums(format_sha256sums(entries, binary=binary))
    assert parsed == {name: digest.lower() for name, digest in entries.items()}


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_with_a_line(text: bytes) -> None:
    try:
        listing = parse_sha256sums(text)
    except Sha256SumsError as error:
        assert error.line is not None and 1 <= error.line <= text.count(b"\n") + 1
    else:
        assert all(len(digest) == 64 for digest in listing.values())
