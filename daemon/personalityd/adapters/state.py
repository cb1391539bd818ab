"""Files written atomically: the persisted desired list and generation, the conflict report.

`state.json` in `state.dir`:

    {"version": 2, "generation": 7, "desired": [{"name": "web", "force": false}, ...],
     "history": [{"generation": 6, "desired": [...], "realtime_usec": ..., "status":
                  "confirmed", "cause": "dbus"}, ...],
     "trial": null or {"generation": 7, "rollback_to": 6, "deadline_usec": ...,
                       "manual": false, "origins": ["web.json"]},
     "upper_data": null or the live subvolume of a btrfs writable volume ("live/7")}

Version 1 files (no history, no trial) are read as well. The history and the trial are
written in the same rename as the desired list, so a crash loses neither.

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

from personalityd.core.history import CAUSES, STATUSES, Generation, TrialRecord
from personalityd.core.model import ConflictReport, DesiredEntry
from personalityd.core.names import is_valid_name

STATE_FILE = "state.json"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFLICT_REPORT_FILE = "conflicts.json"


class StateFileError(Exception):
    """A state file that exists but cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class PersistedState:
    desired: tuple[DesiredEntry, ...] = ()  # bottom first
    generation: int = 0
    history: tuple[Generation, ...] = ()  # oldest first
    trial: TrialRecord | None = None
    upper_data: str | None = None


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
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unsupported version {version!r}, expected {STATE_VERSION}")
    generation = _count(obj.get("generation"), "'generation'")
    desired = _parse_desired(obj.get("desired"), "'desired'")
    history = obj.get("history", [])
    if not isinstance(history, list):
        raise ValueError("'history' must be a list")
    generations = tuple(_parse_generation(g, f"'history'[{i}]") for i, g in enumerate(history))
    trial = obj.get("trial")
    upper_data = obj.get("upper_data")
    if upper_data is not None and not isinstance(upper_data, str):
        raise ValueError("'upper_data' must be a string or null")
    return PersistedState(
        desired=desired,
        generation=generation,
        history=generations,
        trial=None if trial is None else _parse_trial(trial),
        upper_data=upper_data,
    )


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, not {value!r}")
    return value


def _parse_desired(entries: object, where: str) -> tuple[DesiredEntry, ...]:
    if not isinstance(entries, list):
        raise ValueError(f"{where} must be a list")
    desired: list[DesiredEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}[{i}] must be an object")
        name = entry.get("name")
        force = entry.get("force", False)
        if not isinstance(name, str) or not is_valid_name(name):
            raise ValueError(f"{where}[{i}]: invalid personality name {name!r}")
        if not isinstance(force, bool):
            raise ValueError(f"{where}[{i}]: 'force' must be true or false")
        if name in seen:
            raise ValueError(f"{where}[{i}]: {name!r} is listed twice")
        seen.add(name)
        desired.append(DesiredEntry(name=name, force=force))
    return tuple(desired)


def _parse_generation(obj: object, where: str) -> Generation:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    status, cause = obj.get("status"), obj.get("cause")
    if status not in STATUSES:
        raise ValueError(f"{where}: 'status' must be one of {', '.join(STATUSES)}")
    if cause not in CAUSES:
        raise ValueError(f"{where}: 'cause' must be one of {', '.join(CAUSES)}")
    return Generation(
        number=_count(obj.get("generation"), f"{where}: 'generation'"),
        desired=_parse_desired(obj.get("desired"), f"{where}: 'desired'"),
        realtime_usec=_count(obj.get("realtime_usec"), f"{where}: 'realtime_usec'"),
        status=str(status),
        cause=str(cause),
    )


def _parse_trial(obj: object) -> TrialRecord:
    if not isinstance(obj, dict):
        raise ValueError("'trial' must be an object or null")
    manual, origins = obj.get("manual", False), obj.get("origins", [])
    if not isinstance(manual, bool):
        raise ValueError("'trial': 'manual' must be true or false")
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ValueError("'trial': 'origins' must be a list of strings")
    return TrialRecord(
        generation=_count(obj.get("generation"), "'trial': 'generation'"),
        rollback_to=_count(obj.get("rollback_to"), "'trial': 'rollback_to'"),
        deadline_usec=_count(obj.get("deadline_usec"), "'trial': 'deadline_usec'"),
        manual=manual,
        origins=tuple(origins),
    )


def _desired_json(desired: Sequence[DesiredEntry]) -> list[dict[str, Any]]:
    return [{"name": e.name, "force": e.force} for e in desired]


def state_to_json(state: PersistedState) -> dict[str, Any]:
    trial = state.trial
    return {
        "version": STATE_VERSION,
        "generation": state.generation,
        "desired": _desired_json(state.desired),
        "history": [
            {
                "generation": g.number,
                "desired": _desired_json(g.desired),
                "realtime_usec": g.realtime_usec,
                "status": g.status,
                "cause": g.cause,
            }
            for g in state.history
        ],
        "trial": None
        if trial is None
        else {
            "generation": trial.generation,
            "rollback_to": trial.rollback_to,
            "deadline_usec": trial.deadline_usec,
            "manual": trial.manual,
            "origins": list(trial.origins),
        },
        "upper_data": state.upper_data,
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
