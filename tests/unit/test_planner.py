from __future__ import annotations

from dataclasses import replace

import pytest

from personalityd.core.model import BlockDevice, DesiredEntry, Manifest, State, Volume
from personalityd.core.planner import live_names, personality_state, plan_stack


def volume(name: str, incompatibility: str | None = None, minor: int = 0) -> Volume:
    return Volume(
        name=name,
        device=BlockDevice(f"/dev/loop{minor}", (7, minor), {}),
        manifest=Manifest(name, {"ID": "debian"}),
        incompatibility=incompatibility,
    )


VOLUMES = {
    "base-tools": volume("base-tools", minor=1),
    "web": volume("web", minor=2),
    "ds": volume("ds", minor=3),
    "old": volume("old", "VERSION_ID '11' does not match the base VERSION_ID '12'", 4),
    "spare": volume("spare", minor=5),
}

# Which hierarchies each personality's volume has.
PROVIDES = {
    "base-tools": {"/usr"},
    "web": {"/usr", "/etc"},
    "ds": {"/usr"},
    "old": {"/usr", "/etc"},
    "spare": {"/usr"},
}


def provided(name: str, hierarchy: str) -> bool:
    return hierarchy in PROVIDES[name]


def entries(*names: str, force: tuple[str, ...] = ()) -> list[DesiredEntry]:
    return [DesiredEntry(name, force=name in force) for name in names]


@pytest.mark.parametrize(
    ("desired", "live", "layers"),
    [
        ([], (), {"/usr": (), "/etc": (), "/opt": ()}),
        (
            entries("base-tools", "web"),
            ("base-tools", "web"),
            {"/usr": ("web", "base-tools"), "/etc": ("web",), "/opt": ()},
        ),
        (
            entries("web", "base-tools", "ds"),
            ("web", "base-tools", "ds"),
            {"/usr": ("ds", "base-tools", "web"), "/etc": ("web",), "/opt": ()},
        ),
        # absent volumes keep their place for later but are not live now
        (
            entries("base-tools", "gone", "web"),
            ("base-tools", "web"),
            {"/usr": ("web", "base-tools"), "/etc": ("web",), "/opt": ()},
        ),
        # incompatible: left out unless forced
        (entries("old", "web"), ("web",), {"/usr": ("web",), "/etc": ("web",), "/opt": ()}),
        (
            entries("old", "web", force=("old",)),
            ("old", "web"),
            {"/usr": ("web", "old"), "/etc": ("web", "old"), "/opt": ()},
        ),
        # a repeated name counts once, in its first place
        (
            entries("ds", "web", "ds"),
            ("ds", "web"),
            {"/usr": ("web", "ds"), "/etc": ("web",), "/opt": ()},
        ),
    ],
)
def test_plan_stack(
    desired: list[DesiredEntry], live: tuple[str, ...], layers: dict[str, tuple[str, ...]]
) -> None:
    plan = plan_stack(desired, VOLUMES, provided, ["/usr", "/etc", "/opt"])
    assert plan.live == live
    assert dict(plan.layers) == layers
    assert list(plan.layers) == ["/usr", "/etc", "/opt"]


def test_plan_stack_excludes_failed_volumes() -> None:
    plan = plan_stack(entries("ds", "web"), VOLUMES, provided, ["/usr"], exclude={"ds"})
    assert plan.live == ("web",)
    assert plan.layers == {"/usr": ("web",)}


def test_live_names() -> None:
    assert live_names(entries("web", "gone", "old"), VOLUMES) == ("web",)


REFUSAL = "it provides the protected path /etc/shadow"


def test_a_refused_volume_is_never_live_not_even_forced() -> None:
    volumes = {**VOLUMES, "evil": replace(volume("evil", minor=9), refusal=REFUSAL)}
    assert live_names(entries("web", "evil", force=("evil",)), volumes) == ("web",)
    states = personality_state(entries("evil", force=("evil",)), volumes, (), (), {})
    assert states["evil"] == (State.INCOMPATIBLE, REFUSAL)


REASON = "VERSION_ID '11' does not match the base VERSION_ID '12'"


@pytest.mark.parametrize(
    ("desired", "volumes", "live", "draining", "failed", "expected"),
    [
        (
            entries("base-tools", "web"),
            ["base-tools", "web", "spare", "old"],
            ["base-tools", "web"],
            [],
            {},
            {
                "base-tools": (State.ATTACHED, ""),
                "web": (State.ATTACHED, ""),
                "spare": (State.AVAILABLE, ""),
                "old": (State.INCOMPATIBLE, REASON),
            },
        ),
        # desired but absent: pending, even while its old mount drains
        (
            entries("web"),
            [],
            [],
            ["web"],
            {},
            {"web": (State.PENDING, "volume not present")},
        ),
        # desired, present, incompatible, not forced
        (entries("old"), ["old"], [], [], {}, {"old": (State.INCOMPATIBLE, REASON)}),
        # forced incompatible is attached when live
        (entries("old", force=("old",)), ["old"], ["old"], [], {}, {"old": (State.ATTACHED, "")}),
        # detached and still held by the kernel
        (
            [],
            ["web"],
            [],
            ["web", "vanished"],
            {},
            {
                "web": (
                    State.DRAINING,
                    "no longer stacked, still in use by processes of an earlier generation",
                ),
                "vanished": (
                    State.DRAINING,
                    "no longer stacked, still in use by processes of an earlier generation",
                ),
            },
        ),
        # failed beats everything but live
        (
            entries("ds"),
            ["ds", "web"],
            [],
            ["ds"],
            {"ds": "mount: wrong fs type", "web": "index failed"},
            {
                "ds": (State.FAILED, "mount: wrong fs type"),
                "web": (State.FAILED, "index failed"),
            },
        ),
        # desired, present, usable, but not stacked yet
        (
            entries("web"),
            ["web"],
            [],
            [],
            {},
            {"web": (State.PENDING, "waiting for the stack to be rebuilt")},
        ),
        # live beats draining (an old generation of the same name still held)
        (entries("web"), ["web"], ["web"], ["web"], {}, {"web": (State.ATTACHED, "")}),
    ],
)
def test_personality_state(
    desired: list[DesiredEntry],
    volumes: list[str],
    live: list[str],
    draining: list[str],
    failed: dict[str, str],
    expected: dict[str, tuple[State, str]],
) -> None:
    present = {name: VOLUMES[name] for name in volumes}
    assert personality_state(desired, present, live, draining, failed) == expected
