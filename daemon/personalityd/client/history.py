"""`personalityctl history`, `rollback` and `confirm`: the generations the daemon keeps, going
back to one of them, and keeping a trial."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from personalityd.client.changes import (
    CHANGE_TIMEOUT,
    ERROR_ROLLED_BACK,
    add_json_argument,
    add_trial_arguments,
    announce_trial,
    change_timeout,
    generation,
    options_of,
    outcome,
    outcome_of,
    seconds,
)
from personalityd.client.connection import Client, CliError
from personalityd.client.output import PROG, count, format_table, print_json
from personalityd.core.names import SIG_OPTIONS

CONFIRMED: Final = "confirmed"
TRIAL: Final = "trial"
ROLLED_BACK: Final = "rolled-back"
# How long `confirm` watches for the daemon to act on it (a trial confirmed by hand after its
# checks passed is confirmed within a moment).
CONFIRM_SETTLE: Final = 3.0
CONFIRM_POLL: Final = 0.1
BASE_ONLY: Final = "(base only)"
HISTORY_HEADERS: Final = ("GENERATION", "TIME", "STATUS", "CAUSE", "DESIRED")


@dataclass(frozen=True)
class Entry:
    """One row of ListGenerations."""

    generation: int
    desired: tuple[str, ...]  # bottom first
    realtime_usec: int
    status: str  # confirmed, trial, rolled-back
    cause: str  # dbus, spool, udev, rollback, start


def entries(rows: Sequence[Sequence[Any]]) -> list[Entry]:
    return [Entry(int(g), tuple(d), int(t), str(s), str(c)) for g, d, t, s, c in rows]


async def read_history(client: Client) -> list[Entry]:
    (rows,) = await client.call("ListGenerations")
    return entries(rows)


def local_time(usec: int) -> str:
    return datetime.fromtimestamp(usec / 1e6, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def iso_time(usec: int) -> str:
    return datetime.fromtimestamp(usec / 1e6, tz=UTC).astimezone().isoformat(timespec="seconds")


def render_history(history: Sequence[Entry], current: int) -> str:
    if not history:
        return "No generations."
    rows = [
        (
            f"{e.generation} (current)" if e.generation == current else str(e.generation),
            local_time(e.realtime_usec),
            e.status,
            e.cause,
            " ".join(e.desired) or BASE_ONLY,
        )
        for e in history
    ]
    table = format_table(HISTORY_HEADERS, rows)
    return f"{table}\n\n{count(len(rows), 'generation', 'generations')} kept."


def history_as_dicts(history: Sequence[Entry], current: int) -> list[dict[str, Any]]:
    return [
        {
            "generation": e.generation,
            "desired": list(e.desired),
            "time": iso_time(e.realtime_usec),
            "realtime_usec": e.realtime_usec,
            "status": e.status,
            "cause": e.cause,
            "current": e.generation == current,
        }
        for e in history
    ]


def on_trial(history: Sequence[Entry]) -> int | None:
    """The generation on trial, if one is."""
    return next((e.generation for e in reversed(history) if e.status == TRIAL), None)


def trial_notice(trial: int) -> str:
    """The `Trial:` line of `status` (the deadline is the daemon's; the journal has it)."""
    return f"generation {trial} is on trial: '{PROG} confirm' keeps it, '{PROG} rollback' undoes it"


def rollback_target(history: Sequence[Entry], current: int, requested: int) -> Entry | None:
    """The entry whose stack Rollback(`requested`) brings back, as the daemon chooses it:
    0 is the newest confirmed generation older than the current one. None if unknown (the
    daemon then says why)."""
    if requested:
        return next((e for e in history if e.generation == requested), None)
    older = [e for e in history if e.status == CONFIRMED and e.generation < current]
    return older[-1] if older else None


# -- verbs --------------------------------------------------------------------------------------


async def verb_history(client: Client, args: argparse.Namespace) -> int:
    history = await read_history(client)
    current = int((await client.properties()).get("Generation", 0))
    if args.json:
        print_json(history_as_dicts(history, current))
    else:
        print(render_history(history, current))
    return 0


async def verb_rollback(client: Client, args: argparse.Namespace) -> int:
    before = int((await client.properties()).get("Generation", 0))
    target = rollback_target(await read_history(client), before, args.generation)
    announce_trial(args)
    (new,) = await client.call(
        "Rollback",
        "t" + SIG_OPTIONS,
        [args.generation, options_of(args)],
        timeout=change_timeout(args),
    )
    after = await client.properties()
    if args.json:
        result = outcome_of(after, int(new) != before)
        result["generation"] = int(new)  # the properties may already be a later one's
        result["rolled_back_to"] = target.generation if target is not None else None
        print_json(result)
        return 0
    desired = " ".join(after.get("Desired", [])) or "the base only"
    source = f"generation {target.generation}'s stack" if target is not None else "the stack"
    if int(new) == before:
        print(f"Generation {before} already has {source}: {desired}")
    else:
        print(f"Rolled back to {source} as generation {new}: {desired}")
    return 0


async def verb_confirm(client: Client, args: argparse.Namespace) -> int:
    trial = args.generation or on_trial(await read_history(client))
    await client.call("Confirm", "t", [args.generation], timeout=CHANGE_TIMEOUT)
    status = await settled_status(client, trial) if trial else TRIAL
    if status == ROLLED_BACK:
        raise CliError(
            f"generation {trial} was rolled back before it could be confirmed; "
            f"see '{PROG} history' and the journal",
            ERROR_ROLLED_BACK,
        )
    if args.json:
        result = await outcome(client, True)
        result["confirmed"] = trial
        result["status"] = status
        print_json(result)
    elif status == CONFIRMED:
        print(f"Confirmed generation {trial}.")
    else:
        # An automatic trial, or a manual one whose checks still run: they decide now.
        which = f"generation {trial}" if trial else "the trial"
        print(f"Confirmation given: {which} is kept once its checks pass.")
    return 0


async def settled_status(client: Client, trial: int) -> str:
    """The status of `trial` once the daemon has acted on a Confirm: a trial whose checks
    are done is confirmed at once; one whose checks still run stays `trial`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + CONFIRM_SETTLE
    while True:
        entry = next((e for e in await read_history(client) if e.generation == trial), None)
        status = entry.status if entry is not None else TRIAL
        if status != TRIAL or loop.time() >= end:
            return status
        await asyncio.sleep(CONFIRM_POLL)


# -- arguments --------------------------------------------------------------------------------


def add_history_verbs(verbs: Any) -> None:
    """`history`, `rollback` and `confirm` on `verbs` (argparse's subparsers)."""
    history = verbs.add_parser(
        "history",
        help="List the generations kept, with their stacks and whether they are confirmed.",
        description="List the generations the daemon keeps (oldest first): when each was "
        "made, by what, whether it is confirmed, on trial or was rolled back, and its "
        "desired list (bottom first).",
    )
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.set_defaults(dbus_verb=verb_history)

    rollback = verbs.add_parser(
        "rollback",
        help="Bring back the stack of an earlier generation, as a new generation.",
        description="Apply the desired list of GENERATION (see 'history') as a new change. "
        "Without GENERATION (or 0): the newest confirmed generation before the current one, "
        "so a second rollback flips back.",
    )
    rollback.add_argument("generation", metavar="GENERATION", nargs="?", type=generation, default=0)
    rollback.add_argument(
        "--data",
        action="store_true",
        help="also return the writable layer to that generation's state (btrfs only; the "
        "state left is kept as a snapshot)",
    )
    rollback.add_argument("--wait", metavar="SEC", type=seconds, help="wait for missing volumes")
    rollback.add_argument(
        "--force", action="store_true", help="attach even if incompatible with the base"
    )
    add_trial_arguments(rollback)
    add_json_argument(rollback)
    rollback.set_defaults(dbus_verb=verb_rollback)

    confirm = verbs.add_parser(
        "confirm",
        help="Keep the generation on trial.",
        description="Confirm the trial of GENERATION (default: the one on trial now), as a "
        "trial made with --confirm-mode manual needs before its deadline.",
    )
    confirm.add_argument("generation", metavar="GENERATION", nargs="?", type=generation, default=0)
    add_json_argument(confirm)
    confirm.set_defaults(dbus_verb=verb_confirm)
