"""Files written atomically: the persisted desired list and generation, the conflict report.

`state.json` in `state.dir`:

    {"version": 1, "generation": 7, "desired": [{"name": "web", "force": false}, ...]}

A missing file is a fresh start (nothing desired, generation 0). A file that cannot be read
as such a state is an error: the daemon refuses to start rather than forget the desired list.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalityd.core.model import ConflictReport, DesiredEntry
from personalityd.core.names import is_valid_name

STATE_FILE = "state.json"
STATE_VERSION = 1
CONFLICT_REPORT_FILE = "conflicts.json"


class StateFileError(Exception):
    """A state file that exists but cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class PersistedState:
    desired: tuple[DesiredEntry, ...] = ()  # bottom first
    generation: int = 0


def load_state(state_dir: Path) -> PersistedState:
    """The state saved in `state_dir`, or an empty one (generation 0) when there is none.

    Raises StateFileError for a corrupt file, OSError when it cannot be read.
    """
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return PersistedState()
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{path}: not a JSON state file ({e}); fix or remove it") from e
    try:
        return _parse_state(obj)
    except ValueError as e:
        raise StateFileError(f"{path}: {e}; fix or remove it") from e


def _parse_state(obj: object) -> PersistedState:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    version = obj.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise ValueError(f"unsupported version {version!r}, expected {STATE_VERSION}")
    generation = obj.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise ValueError(f"'generation' must be a non-negative integer, not {generation!r}")
    entries = obj.get("desired")
    if not isinstance(entries, list):
        raise ValueError("'desired' must be a list")
    desired: list[DesiredEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"'desired'[{i}] must be an object")
        name = entry.get("name")
        force = entry.get("force", False)
        if not isinstance(name, str) or not is_valid_name(name):
            raise ValueError(f"'desired'[{i}]: invalid personality name {name!r}")
        if not isinstance(force, bool):
            raise ValueError(f"'desired'[{i}]: 'force' must be true or false")
        if name in seen:
            raise ValueError(f"'desired'[{i}]: {name!r} is listed twice")
        seen.add(name)
        desired.append(DesiredEntry(name=name, force=force))
    return PersistedState(desired=tuple(desired), generation=generation)


def state_to_json(state: PersistedState) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "generation": state.generation,
        "desired": [{"name": e.name, "force": e.force} for e in state.desired],
    }


def save_state(state_dir: Path, state: PersistedState) -> None:
    """Replace `state_dir`/state.json atomically and durably. On failure (ENOSPC, EIO) the old
    file is left as it was and the OSError propagates."""
    write_json_atomic(state_dir / STATE_FILE, state_to_json(state))


def write_json_atomic(path: Path, obj: object, mode: int = 0o644) -> None:
    """Write `obj` as JSON to `path`: a temporary dotfile in the same directory, fsync, rename
    over `path`, fsync the directory. Readers see the old file or the new one, never a part;
    on any error the temporary file is removed and `path` is untouched."""
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def conflict_report_json(
    generation: int, attached: Sequence[str], report: ConflictReport
) -> dict[str, Any]:
    return {
        "generation": generation,
        "attached": list(attached),
        "overrides": report.overrides,
        "conflicts": [
            {
                "path": c.path,
                "hierarchy": c.hierarchy,
                "winner": c.winner,
                "shadowed": list(c.shadowed),
                "identical": c.identical,
            }
            for c in report.conflicts
        ],
        "masks": [
            {"path": m.path, "hierarchy": m.hierarchy, "name": m.name, "mask": m.mask}
            for m in report.masks
        ],
    }


def write_conflict_report(
    runtime_dir: Path, generation: int, attached: Sequence[str], report: ConflictReport
) -> None:
    """Write `runtime_dir`/conflicts.json; `attached` bottom first, conflicts as reported."""
    write_json_atomic(
        runtime_dir / CONFLICT_REPORT_FILE, conflict_report_json(generation, attached, report)
    )
