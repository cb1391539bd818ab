"""os-release syntax, systemd's architecture names, and the base's os-release as data."""

from __future__ import annotations

import re
from collections.abc import Mapping

from personalityd.core.model import OsRelease

KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Characters a backslash escapes inside double quotes (as in the shell); before any other
# character the backslash is kept.
_DOUBLE_QUOTE_ESCAPES = frozenset('"\\`$')
_BLANKS = " \t"

# platform.machine() (uname -m) spelling -> systemd's ARCHITECTURE spelling.
_ARCHITECTURES = {
    "x86_64": "x86-64",
    "amd64": "x86-64",
    "aarch64": "arm64",
    "aarch64_be": "arm64-be",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "armv7l": "arm",
    "armv7hl": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64-le",
    "ppc64": "ppc64",
    "ppc": "ppc",
    "s390x": "s390x",
    "s390": "s390",
    "riscv64": "riscv64",
    "riscv32": "riscv32",
    "loongarch64": "loongarch64",
}


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release syntax into a dict; malformed lines are ignored, later keys win.

    One `KEY=value` per line; `#` starts a comment line; values may be unquoted, 'single
    quoted' (literal) or "double quoted" (backslash escapes `"`, `\\`, `$` and backquote),
    and quoted and unquoted parts concatenate as in the shell.
    """
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.strip(_BLANKS + "\r")
        if not line or line.startswith("#"):
            continue
        key, equals, raw = line.partition("=")
        key = key.strip(_BLANKS)
        if not equals or KEY_PATTERN.fullmatch(key) is None:
            continue
        value = _parse_value(raw.lstrip(_BLANKS))
        if value is not None:
            fields[key] = value
    return fields


def _parse_value(raw: str) -> str | None:
    """Unquote one value; None when a quote is not closed."""
    out: list[str] = []
    fixed = 0  # out[:fixed] came from quotes: trailing blanks there are kept
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "'":
            end = raw.find("'", i + 1)
            if end < 0:
                return None
            out.append(raw[i + 1 : end])
            fixed = len(out)
            i = end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    return None
                c = raw[i]
                if c == '"':
                    break
                if c == "\\" and i + 1 < n:
                    if raw[i + 1] in _DOUBLE_QUOTE_ESCAPES:
                        out.append(raw[i + 1])
                    else:
                        out.append(raw[i : i + 2])
                    i += 2
                    continue
                out.append(c)
                i += 1
            fixed = len(out)
            i += 1
        elif c == "\\":
            if i + 1 < n:
                out.append(raw[i + 1])
                fixed = len(out)
            i += 2
        else:
            out.append(c)
            i += 1
    tail = "".join(out[fixed:]).rstrip(_BLANKS)
    return "".join(out[:fixed]) + tail


def systemd_architecture(machine: str) -> str:
    """`platform.machine()` spelling (x86_64) -> systemd's ARCHITECTURE spelling (x86-64)."""
    return _ARCHITECTURES.get(machine, machine)


def base_os_release(fields: Mapping[str, str], architecture: str) -> OsRelease:
    """The base's OsRelease from its parsed os-release; empty values count as unset.

    A missing `ID` is `linux`, the default os-release(5) gives.
    """
    return OsRelease(
        id=fields.get("ID") or "linux",
        id_like=tuple(fields.get("ID_LIKE", "").split()),
        version_id=fields.get("VERSION_ID") or None,
        sysext_level=fields.get("SYSEXT_LEVEL") or None,
        architecture=architecture,
    )
