"""SHA256SUMS listings: the `sha256sum` format that systemd-sysupdate reads, as data.

`images.verify` (docs/images.md) looks an image file up in the `SHA256SUMS` beside it.
The syntax is systemd-sysupdate's (src/sysupdate/sysupdate-resource.c), so one file serves
both tools: every line is `<64 hex digits><space><space or *><name>` and ends in a newline;
the name is a relative path with no `.`, `..` or empty component (so no leading `./`); no
empty lines, comments, NUL bytes, control characters or invalid UTF-8. systemd-importd
(src/import/pull-common.c) is laxer (it also takes a single space) but reads no more. Neither
reads the BSD form `SHA256 (name) = digest` (`sha256sum --tag`), so it is refused, with a
message saying so.

One addition: the escaped lines GNU `sha256sum` writes for a name with a backslash, newline
or carriage return (a leading backslash, then `\\\\`, `\\n`, `\\r` in the name), which
sysupdate refuses outright. The rest of the listing can then be read, where sysupdate gives up.

A listing that cannot be read is refused whole, naming the first bad line: one bad line
means the file is not what its author meant, and guessing which line to trust would let a
corrupted file pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

DIGEST_LENGTH = 64

_DIGEST = re.compile(rb"[0-9a-fA-F]{64}")
_LOWERCASE_DIGEST = re.compile(r"[0-9a-f]{64}")
_BSD_PREFIX = re.compile(rb"(SHA|MD|BLAKE|SM)[0-9A-Za-z-]* ?\(")
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
# What systemd's string_has_cc() calls a control character: refused in a raw line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Sha256SumsError(ValueError):
    """A listing that cannot be read; `str()` names the line and what is wrong with it."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


def parse_sha256sums(text: bytes) -> dict[str, str]:
    """The names a SHA256SUMS file lists, each with its digest in lowercase hex.

    Raises Sha256SumsError for the first line that is not in the format, and for a name
    listed twice with different digests (the same digest twice is harmless and accepted).
    """
    listing: dict[str, str] = {}
    first_line_of: dict[str, int] = {}
    *lines, unterminated = text.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        name, digest = _parse_line(raw, number)
        listed = listing.get(name)
        if listed is not None and listed != digest:
            raise Sha256SumsError(
                f"{name!r} is listed again with another digest (line {first_line_of[name]} "
                f"has {listed[:12]}…, this one {digest[:12]}…)",
                line=number,
            )
        listing[name] = digest
        first_line_of.setdefault(name, number)
    if unterminated:
        raise Sha256SumsError(
            "no newline at the end (the file looks truncated)", line=len(lines) + 1
        )
    return listing


def expected_digest(listing: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The digest listed for the first of `names` that the listing has, else None."""
    for name in names:
        digest = listing.get(name)
        if digest is not None:
            return digest
    return None


def format_sha256sums(entries: Mapping[str, str], *, binary: bool = False) -> bytes:
    """A listing as `sha256sum` (or `sha256sum --binary`) writes it: the inverse of parsing.

    A name with a backslash, newline or carriage return gets GNU's escaped line.
    """
    marker = "*" if binary else " "
    lines = []
    for name, digest in entries.items():
        if _LOWERCASE_DIGEST.fullmatch(digest.lower()) is None:
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        escaped = "".join(_ESCAPES.get(char, char) for char in name)
        prefix = "\\" if escaped != name else ""
        lines.append(f"{prefix}{digest.lower()} {marker}{escaped}\n")
    return "".join(lines).encode()


def _parse_line(raw: bytes, number: int) -> tuple[str, str]:
    if raw == b"":
        raise Sha256SumsError("empty line", line=number)
    escaped = raw.startswith(b"\\")
    body = raw[1:] if escaped else raw
    digest_bytes, separator, marker, name_bytes = body[:64], body[64:65], body[65:66], body[66:]
    if _DIGEST.fullmatch(digest_bytes) is None:
        raise Sha256SumsError(_not_a_digest(raw), line=number)
    if separator != b" " or marker not in (b" ", b"*"):
        raise Sha256SumsError(
            "the digest must be followed by two spaces (or a space and '*') and the name",
            line=number,
        )
    try:
        name = name_bytes.decode()
    except UnicodeDecodeError:
        raise Sha256SumsError("the name is not valid UTF-8", line=number) from None
    control = _CONTROL.search(name)
    if control is not None:
        what = (
            "a carriage return (CRLF line ends?)" if control[0] == "\r" else "a control character"
        )
        raise Sha256SumsError(f"the name contains {what}", line=number)
    if escaped:
        name = _unescape(name, number)
    _check_name(name, number)
    return name, digest_bytes.decode().lower()


def _not_a_digest(raw: bytes) -> str:
    if _BSD_PREFIX.match(raw):
        return (
            "BSD-style line ('SHA256 (name) = digest', sha256sum --tag): like "
            "systemd-sysupdate, only sha256sum's '<digest>  <name>' lines are read"
        )
    return "no SHA-256 digest (64 hex digits) at the start"


def _unescape(name: str, number: int) -> str:
    chars = []
    pending_backslash = False
    for char in name:
        if pending_backslash:
            unescaped = _UNESCAPES.get(char)
            if unescaped is None:
                raise Sha256SumsError(
                    f"unknown escape '\\{char}' in the name (sha256sum writes only "
                    "\\\\, \\n and \\r)",
                    line=number,
                )
            chars.append(unescaped)
            pending_backslash = False
        elif char == "\\":
            pending_backslash = True
        else:
            chars.append(char)
    if pending_backslash:
        raise Sha256SumsError("the name ends in a lone backslash", line=number)
    return "".join(chars)


def _check_name(name: str, number: int) -> None:
    if name == "":
        raise Sha256SumsError("the name is empty", line=number)
    if name.startswith("/"):
        raise Sha256SumsError(f"the name {name!r} is an absolute path", line=number)
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise Sha256SumsError(
            f"the name {name!r} is not a normalized relative path (no '.', '..' or empty "
            "component, so no leading './': list it as sha256sum does when run in the "
            "directory itself)",
            line=number,
        )
