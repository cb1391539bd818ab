"""Spool request bodies: parsing and validation into a Request."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, cast

from personalityd.core.errors import InvalidRequest
from personalityd.core.names import check_name

Action = Literal["attach", "detach", "switch"]
ACTIONS: tuple[Action, ...] = ("attach", "detach", "switch")
FIELDS = ("action", "personality", "personalities", "id", "timeout", "force")
MAX_ID_LENGTH = 256
MAX_TIMEOUT = 86400.0

_ID_PATTERN = re.compile(r'"id"\s*:\s*("(?:[^"\\\n]|\\.){0,1600}")')


@dataclass(frozen=True)
class Request:
    action: Action
    names: tuple[str, ...]  # one name for attach/detach, the new desired list for switch
    id: str | None = None
    timeout: float = 0.0  # seconds to wait for a missing volume
    force: bool = False


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
            f"field 'action' must be 'attach', 'detach' or 'switch', got {_show(action)}"
        )
    names = _switch_names(data) if action == "switch" else (_single_name(data, action),)

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
    )


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
