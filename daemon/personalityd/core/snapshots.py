"""Names of the upper's subvolumes on a btrfs writable volume, and which of them go.

The volume holds three directories of subvolumes (stack/upperdata.py):

- `live/<name>`: the upper in use, and earlier ones not yet pruned. A name is `G` (the
  generation it was made for) or `G.N` when `G` was taken already.
- `snapshots/<G>`: read-only, generation G's upper as it was when G was left.
- `rolled-back/<name>`: read-only, the upper as a rollback left it, named after the generation
  it belonged to (`G`, `G.1`, `G.2`... when that generation was rolled back from more than
  once). The daemon never deletes these.

A snapshot being written is made under a temporary name (`.new-G`) and renamed into place, so
`snapshots/G` is always whole; a temporary one that a crash left is pruned.

Numbers are written in canonical decimal (no sign, no leading zero), so each name stands for
one number and a name someone else put there is never mistaken for ours.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

TEMP_PREFIX = ".new-"

_NUMBER = r"(?:0|[1-9][0-9]*)"
_GENERATION = re.compile(_NUMBER)
_SUFFIXED = re.compile(rf"({_NUMBER})(?:\.([1-9][0-9]*))?")


def generation_name(generation: int) -> str:
    if generation < 0:
        raise ValueError(f"generation {generation} is negative")
    return str(generation)


def parse_generation(name: str) -> int | None:
    """`snapshots/` entry name -> its generation; None for a name that is not ours."""
    return int(name) if _GENERATION.fullmatch(name) else None


def parse_suffixed(name: str) -> tuple[int, int] | None:
    """`live/` or `rolled-back/` entry name -> (generation, suffix; 0 for none)."""
    match = _SUFFIXED.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def suffixed_name(generation: int, suffix: int) -> str:
    base = generation_name(generation)
    return base if suffix == 0 else f"{base}.{suffix}"


def next_free_name(generation: int, existing: Collection[str]) -> str:
    """`G` when no entry is named so, else `G.N` with the smallest N >= 1 that is free."""
    suffix = 0
    while suffixed_name(generation, suffix) in existing:
        suffix += 1
    return suffixed_name(generation, suffix)


def temp_name(generation: int) -> str:
    return TEMP_PREFIX + generation_name(generation)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and parse_generation(name[len(TEMP_PREFIX) :]) is not None


def snapshots_to_prune(existing: Iterable[str], keep: Collection[int]) -> list[str]:
    """The `snapshots/` entries to delete: our generations not in `keep`, and temporaries.
    Names that are not ours are left alone. Sorted by name, for stable logs."""
    doomed = []
    for name in existing:
        generation = parse_generation(name)
        if (generation is not None and generation not in keep) or is_temp_name(name):
            doomed.append(name)
    return sorted(doomed)


def lives_to_prune(existing: Iterable[str], live_name: str) -> list[str]:
    """The `live/` entries to delete: every one of ours except `live_name`."""
    return sorted(n for n in existing if n != live_name and parse_suffixed(n) is not None)


def choose_live(existing: Iterable[str]) -> str | None:
    """The live subvolume to use when none is named: the newest of ours (highest generation,
    then suffix), None when there is none. There is one unless a crash came between a
    restore and the prune that follows its swap."""
    ours = [(parsed, n) for n in existing if (parsed := parse_suffixed(n)) is not None]
    return max(ours)[1] if ours else None
