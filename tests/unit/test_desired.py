"""The desired-list rules (core/desired.py), as tables: list before, request, list after."""

from __future__ import annotations

from dataclasses import replace

import pytest

from personalityd.core.access import SPOOL, Caller, authorize, may_change
from personalityd.core.desired import Edit, check_edit, edit_desired, no_such_message
from personalityd.core.errors import (
    AccessDenied,
    Incompatible,
    InvalidName,
    InvalidRequest,
    MountFailed,
    NoSuchPersonality,
    PersonalityError,
)
from personalityd.core.model import BlockDevice, DesiredEntry, Manifest, Volume


def volume(name: str, incompatible: str | None = None) -> Volume:
    device = BlockDevice(f"/dev/loop-{name}", (7, len(name)), {})
    return Volume(name, device, Manifest(name, {}), incompatible)


VOLUMES = {v.name: v for v in (volume("a"), volume("b"), volume("c"), volume("old", "ID=fedora"))}
FAILED = {"c": "I/O error"}


def entries(spec: str) -> tuple[DesiredEntry, ...]:
    """"a b! c" -> a, b (forced), c."""
    return tuple(DesiredEntry(n.rstrip("!"), n.endswith("!")) for n in spec.split())


@pytest.mark.parametrize(
    ("before", "edit", "after", "changed"),
    [
        ("", Edit("attach", ("a",)), "a", True),
        ("a", Edit("attach", ("b",)), "a b", True),
        ("a b", Edit("attach", ("a",)), "a b", False),
        ("", Edit("attach", ("old",), force=True), "old!", True),
        ("old!", Edit("attach", ("old",)), "old!", False),
        ("a b", Edit("detach", ("a",)), "b", True),
        ("a b", Edit("detach", ("c",)), "a b", False),
        ("gone", Edit("detach", ("gone",)), "", True),
        ("a b", Edit("switch", ("b", "a")), "b a", True),
        ("a b", Edit("switch", ("a", "b")), "a b", False),
        ("a", Edit("switch", ()), "", True),
        ("old! a", Edit("switch", ("a", "old")), "a old!", True),
        ("a", Edit("switch", ("a", "b"), force=True), "a! b!", True),
    ],
)
def test_edit(before: str, edit: Edit, after: str, changed: bool) -> None:
    edited = edit_desired(entries(before), edit, VOLUMES, FAILED)
    assert (edited.desired, edited.changed) == (entries(after), changed)


@pytest.mark.parametrize(
    ("before", "edit", "error", "volume", "message"),
    [
        ("", Edit("attach", ("x",)), NoSuchPersonality, "x", "available: a, b, c, old"),
        ("", Edit("detach", ("x",)), NoSuchPersonality, "x", "no personality named 'x'"),
        ("", Edit("attach", ("c",)), MountFailed, "c", "volume 'c' failed earlier: I/O error"),
        ("", Edit("attach", ("old",)), Incompatible, "old", "with the base: ID=fedora"),
        ("a", Edit("switch", ("a", "old")), Incompatible, "old", "incompatible"),
        ("", Edit("switch", ("a", "a")), InvalidRequest, None, "'a' is listed more than once"),
        ("", Edit("attach", ("../x",)), InvalidName, None, "invalid personality name '../x'"),
    ],
)  # fmt: skip
def test_refused(
    before: str, edit: Edit, error: type[PersonalityError], volume: str | None, message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        edit_desired(entries(before), edit, VOLUMES, FAILED)
    assert raised.value.volume == volume


def test_incompatible_carries_its_cause() -> None:
    with pytest.raises(Incompatible) as raised:
        edit_desired((), Edit("attach", ("old",)), VOLUMES, {})
    assert raised.value.cause == "ID=fedora"


PROTECTED = "it provides the protected path /etc/passwd"


@pytest.mark.parametrize(
    ("before", "edit"),
    [
        ("", Edit("attach", ("evil",))),
        ("", Edit("attach", ("evil",), force=True)),
        ("evil!", Edit("attach", ("evil",), force=True)),
        ("a", Edit("switch", ("a", "evil"), force=True)),
    ],
)
def test_a_refused_volume_is_refused_even_with_force(before: str, edit: Edit) -> None:
    evil = replace(volume("evil"), refusal=PROTECTED)
    with pytest.raises(Incompatible) as raised:
        edit_desired(entries(before), edit, {**VOLUMES, "evil": evil}, {})
    assert str(raised.value) == f"'evil' may not be stacked: {PROTECTED}"
    assert (raised.value.volume, raised.value.cause) == ("evil", PROTECTED)


def test_detaching_a_refused_volume_works() -> None:
    evil = replace(volume("evil"), refusal=PROTECTED)
    edited = edit_desired(entries("a evil!"), Edit("detach", ("evil",)), {"evil": evil}, {})
    assert edited.desired == entries("a")


def test_check_edit_needs_no_volumes() -> None:
    check_edit(Edit("switch", ("a", "b")))
    with pytest.raises(InvalidName):
        check_edit(Edit("detach", ("",)))


def test_no_such_message() -> None:
    assert no_such_message(["x", "y"], {}) == "no personalities named 'x', 'y'; available: none"


@pytest.mark.parametrize(
    ("uid", "gids", "allowed", "ok"),
    [
        (0, frozenset(), frozenset(), True),
        (1000, frozenset({100, 995}), frozenset({995}), True),
        (1000, frozenset({100}), frozenset({995}), False),
        (65534, frozenset(), frozenset(), False),
    ],
)
def test_the_one_authorization_rule(
    uid: int, gids: frozenset[int], allowed: frozenset[int], ok: bool
) -> None:
    caller = Caller(uid, gids, "test", front_end=SPOOL)
    assert may_change(caller, allowed) is ok
    if ok:
        authorize(caller, "Switch", ["personality"], allowed)
    else:
        expected = "Switch is only allowed for root and members of the group 'personality'"
        with pytest.raises(AccessDenied) as denied:
            authorize(caller, "Switch", ["personality"], allowed)
        assert str(denied.value) == expected
