"""The stack planner: desired list + present volumes -> live stack and layers per hierarchy."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from personalityd.core.errors import MountFailed
from personalityd.core.model import DesiredEntry, StackPlan, State, Volume

REASON_ABSENT = "volume not present"
REASON_NOT_STACKED = "waiting for the stack to be rebuilt"
REASON_DRAINING = "no longer stacked, still in use by processes of an earlier generation"


def live_names(
    desired: Sequence[DesiredEntry],
    volumes: Mapping[str, Volume],
    exclude: Collection[str] = (),
) -> tuple[str, ...]:
    """Desired names (bottom first) whose volume is present and compatible, or forced.

    Names in `exclude` (volumes that failed to mount or index) are left out, as are repeats
    and refused volumes (a protected path), forced or not.
    """
    live: list[str] = []
    for entry in desired:
        volume = volumes.get(entry.name)
        if volume is None or entry.name in exclude or entry.name in live:
            continue
        if volume.refusal is None and (volume.compatible or entry.force):
            live.append(entry.name)
    return tuple(live)


def plan_stack(
    desired: Sequence[DesiredEntry],
    volumes: Mapping[str, Volume],
    provided: Callable[[str, str], bool],
    hierarchies: Sequence[str],
    *,
    exclude: Collection[str] = (),
) -> StackPlan:
    """The stack to build: live personalities, and per hierarchy the ones providing it.

    `provided(name, hierarchy)` says whether the personality's volume has that directory.
    Every hierarchy is a key of `layers`, with the providing names top first (last attached
    first), or an empty tuple when none provides it.
    """
    live = live_names(desired, volumes, exclude)
    top_first = tuple(reversed(live))
    layers = {h: tuple(name for name in top_first if provided(name, h)) for h in hierarchies}
    return StackPlan(live=live, layers=layers)


def check_layer_limit(plan: StackPlan, limit: int) -> None:
    """Raise MountFailed when a hierarchy would have more than `limit` layers (with the base)."""
    for h, names in plan.layers.items():
        if len(names) + 1 > limit:
            raise MountFailed(
                f"{h} would have {len(names) + 1} layers ({len(names)} personalities "
                f"and the base); overlayfs allows at most {limit}"
            )


def personality_state(
    desired: Sequence[DesiredEntry],
    volumes: Mapping[str, Volume],
    live: Collection[str],
    draining: Collection[str],
    failed: Mapping[str, str],
) -> dict[str, tuple[State, str]]:
    """Each known personality's state and reason ("" when there is nothing to say), by name.

    Known: desired, present (`volumes`), draining or failed. In order of precedence: live ->
    attached; failed (present volume whose mount or index failed, with its reason) -> failed;
    desired but absent -> pending; draining (still held by the kernel, not live) -> draining;
    refused (a protected path: force or not) -> incompatible, with the refusal as reason;
    present but incompatible (desired without force, or not desired) -> incompatible;
    desired, present and usable but not live yet -> pending; present -> available.
    """
    wanted = {entry.name: entry for entry in desired}
    known = set(wanted) | set(volumes) | set(draining) | set(failed)
    states: dict[str, tuple[State, str]] = {}
    for name in sorted(known):
        volume = volumes.get(name)
        entry = wanted.get(name)
        if name in live:
            states[name] = (State.ATTACHED, "")
        elif name in failed:
            states[name] = (State.FAILED, failed[name])
        elif entry is not None and volume is None:
            states[name] = (State.PENDING, REASON_ABSENT)
        elif name in draining or volume is None:
            states[name] = (State.DRAINING, REASON_DRAINING)
        elif volume.refusal is not None:
            states[name] = (State.INCOMPATIBLE, volume.refusal)
        elif volume.incompatibility is not None and (entry is None or not entry.force):
            states[name] = (State.INCOMPATIBLE, volume.incompatibility)
        elif entry is not None:
            states[name] = (State.PENDING, REASON_NOT_STACKED)
        else:
            states[name] = (State.AVAILABLE, "")
    return states
