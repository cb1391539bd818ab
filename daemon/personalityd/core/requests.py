"""Spool request bodies: parsing and validation into a Request."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, cast

from personalityd.core.errors import InvalidRequest
from personalityd.core.history import CONFIRM_MODES, DEFAULT_TRIAL, MANUAL, TrialOptions
from personalityd.core.names import check_name

Action = Literal["attach", "detach", "switch", "rollback"]
ACTIONS: tuple[Action, ...] = ("attach", "detach", "switch", "rollback")
FIELDS = (
    "action", "personality", "personalities", "generation", "id", "timeout", "force",
    "confirm", "confirm_mode", "data",
)  # fmt: skip
MAX_ID_LENGTH = 256
MAX_TIMEOUT = 86400.0
MAX_UINT32 = 2**32 - 1
MAX_UINT64 = 2**64 - 1

_ID_PATTERN = re.compile(r'"id"\s*:\s*("(?:[^"\\\n]|\\.){0,1600}")')


@dataclass(frozen=True)
class Request:
    action: Action
    names: tuple[str, ...]  # one name for attach/detach, the new desired list for switch
    id: str | None = None
    timeout: float = 0.0  # seconds to wait for a missing volume
    force: bool = False
    generation: int = 0  # rollback: the generation to return to (0: the last confirmed)
    trial: TrialOptions = DEFAULT_TRIAL  # no "confirm": the configured length
    data: bool = False  # rollback: the upper's data too


def parse_request(body: bytes) -> Request:
    """Validate a request body; raises InvalidRequest or InvalidName with a one-line reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request is not valid UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except RecursionError:
        raise InvalidRequest("request is not JSON: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and our hooks' refusals
        raise InvalidRequest(f"request is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request must be a JSON object, got {_kind(data)}")

    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        shown = ", ".join(_field(key) for key in unknown[:5]) + (", ..." if unknown[5:] else "")
        raise InvalidRequest(f"unknown field{'s' if len(unknown) > 1 else ''} {shown}")

    if "action" not in data:
        raise InvalidRequest("missing field 'action'")
    action = data["action"]
    if action not in ACTIONS:
        raise InvalidRequest(
            "field 'action' must be 'attach', 'detach', 'switch' or 'rollback', "
            f"got {_show(action)}"
        )
    if action == "rollback":
        names: tuple[str, ...] = _no_names(data)
    elif action == "switch":
        names = _switch_names(data)
    else:
        names = (_single_name(data, action),)
    generation, trial, wants_data = _transaction_fields(data, action)

    request_id = data.get("id")
    if "id" in data and (not isinstance(request_id, str) or len(request_id) > MAX_ID_LENGTH):
        raise InvalidRequest(
            f"field 'id' must be a string of at most {MAX_ID_LENGTH} characters, "
            f"got {_show(request_id)}"
        )

    timeout = data.get("timeout", 0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout <= MAX_TIMEOUT
    ):
        raise InvalidRequest(
            f"field 'timeout' must be a number of seconds from 0 to {MAX_TIMEOUT:.0f}, "
            f"got {_show(timeout)}"
        )
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise InvalidRequest(f"field 'force' must be true or false, got {_show(force)}")

    for name in names:
        check_name(name)
    return Request(
        action=cast(Action, action),
        names=names,
        id=request_id,
        timeout=float(timeout),
        force=force,
        generation=generation,
        trial=trial,
        data=wants_data,
    )


def _transaction_fields(data: dict[str, Any], action: str) -> tuple[int, TrialOptions, bool]:
    """A rollback's "generation" and "data", and the trial asked for ("confirm" seconds and
    "confirm_mode"; without "confirm", the configured length)."""
    for key in ("generation", "data"):
        if key in data and action != "rollback":
            raise InvalidRequest(f"field {key!r} is only for action 'rollback'")
    generation = _integer(data, "generation", MAX_UINT64)
    confirm = _integer(data, "confirm", MAX_UINT32)
    mode = data.get("confirm_mode", "auto")
    if mode not in CONFIRM_MODES:
        raise InvalidRequest(f"field 'confirm_mode' must be 'auto' or 'manual', got {_show(mode)}")
    wants_data = data.get("data", False)
    if not isinstance(wants_data, bool):
        raise InvalidRequest(f"field 'data' must be true or false, got {_show(wants_data)}")
    trial = TrialOptions(confirm if "confirm" in data else None, mode == MANUAL)
    return generation, trial, wants_data


def _integer(data: dict[str, Any], key: str, high: int) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidRequest(
            f"field {key!r} must be a whole number from 0 to {high}, got {_show(value)}"
        )
    return value


def _no_names(data: dict[str, Any]) -> tuple[str, ...]:
    for key in ("personality", "personalities"):
        if key in data:
            raise InvalidRequest(
                f"field {key!r} is not allowed with action 'rollback' (use 'generation')"
            )
    return ()


def _single_name(data: dict[str, Any], action: str) -> str:
    if "personalities" in data:
        raise InvalidRequest(
            f"field 'personalities' is not allowed with action {action!r} (use 'personality')"
        )
    if "personality" not in data:
        raise InvalidRequest(f"missing field 'personality' (action {action!r} needs it)")
    name = data["personality"]
    if not isinstance(name, str):
        raise InvalidRequest(f"field 'personality' must be a string, got {_show(name)}")
    return name


def _switch_names(data: dict[str, Any]) -> tuple[str, ...]:
    if "personality" in data:
        raise InvalidRequest(
            "field 'personality' is not allowed with action 'switch' (use 'personalities')"
        )
    if "personalities" not in data:
        raise InvalidRequest("missing field 'personalities' (action 'switch' needs it)")
    names = data["personalities"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InvalidRequest(f"field 'personalities' must be a list of strings, got {_show(names)}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidRequest(f"field 'personalities' lists {_show(name)} more than once")
        seen.add(name)
    return tuple(names)


def request_id_of(body: bytes) -> str | None:
    """The request's "id", best effort, to echo in the result even of an invalid request."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        pass  # not JSON: look for an "id" member in the text
    else:
        value = data.get("id") if isinstance(data, dict) else None
        return value if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else None
    match = _ID_PATTERN.search(text)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate field {key!r}")
        data[key] = value
    return data


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _field(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:37] + "...")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: object) -> str:
    """A JSON value as the user wrote it, cut short; its kind for lists and objects."""
    if isinstance(value, list | dict):
        return _kind(value)
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 80 else shown[:77] + "..."
