"""Personality names and how hierarchy paths are spelled in file names."""

from __future__ import annotations

import re

from personalityd.core.errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def check_name(name: str) -> str:
    """Return `name` if it is a valid personality name, else raise InvalidName saying why."""
    if is_valid_name(name):
        return name
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise InvalidName(
        f"invalid personality name {shown!r}: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"
    )


def hierarchy_key(hierarchy: str) -> str:
    """`/usr` -> `_usr`, `/usr/local` -> `_usr_local`: the hierarchy as one path component."""
    return hierarchy.rstrip("/").replace("/", "_")
