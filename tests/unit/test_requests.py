from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.core.errors import InvalidName, InvalidRequest, PersonalityError
from personalityd.core.history import TrialOptions
from personalityd.core.requests import ACTIONS, Request, parse_request, request_id_of


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"action": "attach", "personality": "web"},
            Request("attach", ("web",), None, 0.0, False),
        ),
        (
            {"action": "detach", "personality": "web", "id": "req-1"},
            Request("detach", ("web",), "req-1", 0.0, False),
        ),
        (
            {"action": "switch", "personalities": ["base-tools", "web"]},
            Request("switch", ("base-tools", "web"), None, 0.0, False),
        ),
        (
            {"action": "switch", "personalities": []},
            Request("switch", (), None, 0.0, False),
        ),
        (
            {"action": "attach", "personality": "w.e_b-1", "timeout": 30, "force": True},
            Request("attach", ("w.e_b-1",), None, 30.0, True),
        ),
        (
            {"action": "attach", "personality": "web", "timeout": 0.5, "id": "x" * 256},
            Request("attach", ("web",), "x" * 256, 0.5, False),
        ),
        (
            {"action": "attach", "personality": "web", "timeout": 86400, "force": False},
            Request("attach", ("web",), None, 86400.0, False),
        ),
    ],
)
def test_parse_valid(body: dict[str, object], expected: Request) -> None:
    assert parse_request(json.dumps(body).encode()) == expected


ATTACH = {"action": "attach", "personality": "web"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe{}", "request is not valid UTF-8"),
        (b"{", "request is not JSON: "),
        (b"", "request is not JSON: "),
        (b'{"action": "attach", "personality": "web",}', "request is not JSON: "),
        (b"[" * 100000, "request is not JSON"),
        (b'{"action": "attach", "personality": "web", "timeout": NaN}', "request is not JSON"),
        (
            b'{"action": "attach", "action": "detach", "personality": "web"}',
            "request is not JSON: duplicate field 'action'",
        ),
        (b"[]", "request must be a JSON object, got a list"),
        (b'"attach"', "request must be a JSON object, got a string"),
        (b"null", "request must be a JSON object, got null"),
        (json.dumps({**ATTACH, "colour": "red"}).encode(), "unknown field 'colour'"),
        (json.dumps({**ATTACH, "b": 1, "a": 2}).encode(), "unknown fields 'b', 'a'"),
        (b"{}", "missing field 'action'"),
        (b'{"personality": "web"}', "missing field 'action'"),
        (b'{"action": "mount", "personality": "web"}', "field 'action' must be"),
        (b'{"action": 1, "personality": "web"}', "field 'action' must be"),
        (b'{"action": null, "personality": "web"}', "field 'action' must be"),
        (b'{"action": "attach"}', "missing field 'personality'"),
        (b'{"action": "detach", "personality": 3}', "field 'personality' must be a string"),
        (
            b'{"action": "attach", "personality": "web", "personalities": ["web"]}',
            "field 'personalities' is not allowed with action 'attach'",
        ),
        (
            b'{"action": "detach", "personalities": ["web"]}',
            "field 'personalities' is not allowed with action 'detach'",
        ),
        (b'{"action": "switch"}', "missing field 'personalities'"),
        (
            b'{"action": "switch", "personality": "web"}',
            "field 'personality' is not allowed with action 'switch'",
        ),
        (
            b'{"action": "switch", "personalities": "web"}',
            "field 'personalities' must be a list of strings",
        ),
        (
            b'{"action": "switch", "personalities": ["web", 1]}',
            "field 'personalities' must be a list of strings",
        ),
        (
            b'{"action": "switch", "personalities": ["web", "ds", "web"]}',
            "field 'personalities' lists \"web\" more than once",
        ),
        (json.dumps({**ATTACH, "id": 5}).encode(), "field 'id' must be a string"),
        (json.dumps({**ATTACH, "id": None}).encode(), "field 'id' must be a string"),
        (json.dumps({**ATTACH, "id": "x" * 257}).encode(), "field 'id' must be a string"),
        (json.dumps({**ATTACH, "timeout": -1}).encode(), "field 'timeout' must be a number"),
        (json.dumps({**ATTACH, "timeout": 86401}).encode(), "field 'timeout' must be a number"),
        (json.dumps({**ATTACH, "timeout": True}).encode(), "field 'timeout' must be a number"),
        (json.dumps({**ATTACH, "timeout": "5"}).encode(), "field 'timeout' must be a number"),
        (b'{"action": "attach", "personality": "web", "timeout": 1e999}', "field 'timeout'"),
        (json.dumps({**ATTACH, "force": 1}).encode(), "field 'force' must be true or false"),
        (json.dumps({**ATTACH, "force": "yes"}).encode(), "field 'force' must be true or false"),
    ],
)
def test_parse_invalid(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert info.value.code == "invalid-request"


@pytest.mark.parametrize(
    "body",
    [
        {"action": "attach", "personality": "-web"},
        {"action": "detach", "personality": ""},
        {"action": "attach", "personality": "web/../../etc"},
        {"action": "switch", "personalities": ["ok", "not ok"]},
        {"action": "switch", "personalities": ["a" * 65]},
    ],
)
def test_parse_bad_names(body: dict[str, object]) -> None:
    with pytest.raises(InvalidName) as info:
        parse_request(json.dumps(body).encode())
    assert info.value.code == "invalid-name"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"action": "attach", "personality": "web", "id": "abc"}', "abc"),
        (b'{"action": "attach", "personality": "-bad", "id": "abc"}', "abc"),
        (b'{"id": "abc", "colour": 1}', "abc"),
        (b'{"id": "a\\"b", "action": "attach",}', 'a"b'),  # invalid JSON, id still found
        (b'{"id": "abc", "action": "attach", "personality": "w\xff"}', "abc"),
        (b'{"id": 5}', None),
        (b'{"action": "attach"}', None),
        (b"[1, 2]", None),
        (b'[{"id": "abc"}]', None),
        (b"not json at all", None),
        (b"\xff\xfe", None),
        (json.dumps({"id": "x" * 300}).encode(), None),
    ],
)
def test_request_id_of(body: bytes, expected: str | None) -> None:
    assert request_id_of(body) == expected


@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash(body: bytes) -> None:
    with contextlib.suppress(PersonalityError):
        parse_request(body)
    request_id_of(body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
FIELD = st.sampled_from(["action", "personality", "personalities", "id", "timeout", "force"])


@given(st.dictionaries(FIELD | st.text(max_size=5), JSON | st.sampled_from(["attach", "switch"])))
def test_arbitrary_objects_never_crash(data: dict[str, object]) -> None:
    body = json.dumps(data).encode()
    try:
        request = parse_request(body)
    except PersonalityError as e:
        assert "\n" not in str(e)
    else:
        assert request.action in ("attach", "detach", "switch", "rollback")
    request_id_of(body)


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    action = draw(st.sampled_from(ACTIONS))
    if action == "switch":
        names = tuple(draw(st.lists(NAMES, unique=True, max_size=5)))
    elif action == "rollback":
        names = ()
    else:
        names = (draw(NAMES),)
    rollback = action == "rollback"
    return Request(
        action=action,
        names=names,
        id=draw(st.none() | st.text(max_size=256)),
        timeout=draw(st.floats(min_value=0, max_value=86400) | st.integers(0, 86400).map(float)),
        force=draw(st.booleans()),
        generation=draw(st.integers(0, 2**64 - 1)) if rollback else 0,
        trial=TrialOptions(draw(st.none() | st.integers(0, 2**32 - 1)), draw(st.booleans())),
        data=draw(st.booleans()) if rollback else False,
    )


@given(requests())
def test_valid_requests_round_trip(request: Request) -> None:
    data: dict[str, object] = {"action": request.action, "timeout": request.timeout}
    if request.action == "switch":
        data["personalities"] = list(request.names)
    elif request.action == "rollback":
        data["generation"] = request.generation
        data["data"] = request.data
    else:
        data["personality"] = request.names[0]
    if request.trial.seconds is not None:
        data["confirm"] = request.trial.seconds
    data["confirm_mode"] = "manual" if request.trial.manual else "auto"
    if request.id is not None:
        data["id"] = request.id
    if request.force:
        data["force"] = True
    body = json.dumps(data, ensure_ascii=False).encode()
    assert parse_request(body) == request
    assert request_id_of(body) == request.id
