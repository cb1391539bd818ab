"""The rules that edit the desired list: one request in, the new list and `changed` out.

Pure: the present volumes and the volumes whose mount failed are passed in. A request that
breaks a rule raises the domain error the caller gets, and the list stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from personalityd.core.errors import Incompatible, InvalidRequest, MountFailed, NoSuchPersonality
from personalityd.core.model import DesiredEntry, Volume
from personalityd.core.names import check_name

Action = Literal["attach", "detach", "switch"]


@dataclass(frozen=True)
class Edit:
    """What a request asks of the desired list."""

    action: Action
    names: tuple[str, ...]
    force: bool = False
    forced: tuple[str, ...] = ()  # names forced one by one (a Rollback restores them so)

    def describe(self) -> str:
        return f"{self.action} {' '.join(self.names)}".strip()


@dataclass(frozen=True)
class Edited:
    desired: tuple[DesiredEntry, ...]
    changed: bool  # the desired list is different (what the caller is answered)


def no_such_message(missing: Sequence[str], present: Mapping[str, object]) -> str:
    available = ", ".join(sorted(present)) or "none"
    noun = "personality" if len(missing) == 1 else "personalities"
    return f"no {noun} named {quoted(missing)}; available: {available}"


def quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def check_edit(edit: Edit) -> None:
    """What can be refused before anything is looked up: bad names, a name twice."""
    seen: set[str] = set()
    for name in edit.names:
        check_name(name)
        if name in seen:
            raise InvalidRequest(f"personality {name!r} is listed more than once")
        seen.add(name)


def edit_desired(
    desired: Sequence[DesiredEntry],
    edit: Edit,
    volumes: Mapping[str, Volume],
    failed: Mapping[str, str],
) -> Edited:
    """Apply `edit` to `desired` (bottom first). Raises PersonalityError when refused."""
    check_edit(edit)
    if edit.action == "detach":
        return _detach(desired, edit.names[0], volumes)
    for name in edit.names:
        _check_usable(name, edit.force or name in edit.forced, desired, volumes, failed)
    if edit.action == "attach":
        return _attach(desired, edit.names[0], edit.force)
    return _switch(desired, edit.names, edit.force, edit.forced)


def _check_usable(
    name: str,
    force: bool,
    desired: Sequence[DesiredEntry],
    volumes: Mapping[str, Volume],
    failed: Mapping[str, str],
) -> None:
    volume = volumes.get(name)
    if volume is None:
        raise NoSuchPersonality(no_such_message([name], volumes), volume=name)
    if name in failed:
        raise MountFailed(f"volume '{name}' failed earlier: {failed[name]}", volume=name)
    if volume.refusal is not None:
        raise Incompatible(
            f"'{name}' may not be stacked: {volume.refusal}",
            volume=name,
            cause=volume.refusal,
        )
    forced_before = any(e.name == name and e.force for e in desired)
    if volume.incompatibility is not None and not force and not forced_before:
        raise Incompatible(
            f"'{name}' is incompatible with the base: {volume.incompatibility}",
            volume=name,
            cause=volume.incompatibility,
        )


def _attach(desired: Sequence[DesiredEntry], name: str, force: bool) -> Edited:
    if any(e.name == name for e in desired):
        return Edited(tuple(desired), changed=False)
    return Edited((*desired, DesiredEntry(name, force)), changed=True)


def _detach(desired: Sequence[DesiredEntry], name: str, volumes: Mapping[str, Volume]) -> Edited:
    present = any(e.name == name for e in desired)
    if not present and name not in volumes:
        # Nothing to detach and no such volume: most likely a typo; say so.
        raise NoSuchPersonality(no_such_message([name], volumes), volume=name)
    return Edited(tuple(e for e in desired if e.name != name), changed=present)


def _switch(
    desired: Sequence[DesiredEntry], names: Sequence[str], force: bool, also: Sequence[str] = ()
) -> Edited:
    forced = {e.name for e in desired if e.force} | set(also)
    new = tuple(DesiredEntry(n, force or n in forced) for n in names)
    return Edited(new, changed=[e.name for e in new] != [e.name for e in desired])
