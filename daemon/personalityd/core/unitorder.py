"""The order of a personality's `PERSONALITY_SERVICES`: dependencies first.

The units the maintainer scripts enabled are ordered so that a unit comes after those of the
set it is ordered `After=`, `Requires=`, `BindsTo=` or `Wants=` (and before those it is
`Before=`), as their unit files say; among units that do not depend on each other, sockets
come first, then services, then timers and paths, then the rest, each by name. A cycle is
broken in the same order.

Pure: unit file text in, names out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_AFTER_KEYS = ("After", "Requires", "BindsTo", "Wants", "Requisite")
_KIND_ORDER = {"socket": 0, "service": 1, "timer": 2, "path": 3}


def unit_relations(text: str) -> tuple[set[str], set[str]]:
    """(units it comes after, units it comes before) from a unit file's [Unit] section."""
    after: set[str] = set()
    before: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Unit" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key in _AFTER_KEYS:
            after.update(value.split())
        elif key == "Before":
            before.update(value.split())
    return after, before


def _rank(unit: str) -> tuple[int, str]:
    kind = unit.rsplit(".", 1)[-1]
    return _KIND_ORDER.get(kind, 4), unit


def template_of(unit: str) -> str:
    """'foo@bar.service' -> 'foo@.service' (whose file describes the instance)."""
    name, _, kind = unit.rpartition(".")
    if "@" in name:
        return name.split("@", 1)[0] + "@." + kind
    return unit


def order_units(units: Sequence[str], unit_files: Mapping[str, str]) -> list[str]:
    """`units` (deduplicated) with dependencies first; `unit_files` maps a name to its text."""
    wanted = sorted(set(units), key=_rank)
    deps: dict[str, set[str]] = {u: set() for u in wanted}
    for unit in wanted:
        text = unit_files.get(unit) or unit_files.get(template_of(unit), "")
        after, before = unit_relations(text)
        deps[unit] |= {a for a in after if a in deps and a != unit}
        for b in before:
            if b in deps and b != unit:
                deps[b].add(unit)
    ordered: list[str] = []
    remaining = list(wanted)
    while remaining:
        ready = [u for u in remaining if not deps[u] - set(ordered)]
        pick = ready[0] if ready else remaining[0]  # a cycle: break it in rank order
        ordered.append(pick)
        remaining.remove(pick)
    return ordered
