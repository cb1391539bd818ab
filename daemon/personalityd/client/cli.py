"""personalityctl: look at and change the personality stack through personalityd on D-Bus.

Exit status: 0 success, 1 the operation failed (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from dbus_fast import Variant

from personalityd import __version__
from personalityd.client.buildverb import UsageError, add_build_verb
from personalityd.client.changes import (
    CHANGE_TIMEOUT,
    add_json_argument,
    add_trial_arguments,
    announce_trial,
    change_timeout,
    failure_json,
    failure_line,
    options_of,
    outcome,
    seconds,
)
from personalityd.client.connection import ERROR_UNKNOWN_METHOD, Client, CliError
from personalityd.client.history import add_history_verbs, on_trial, read_history, trial_notice
from personalityd.client.output import PROG, count, format_table, print_json
from personalityd.core.names import (
    OPTION_FROM_UNIT,
    SIG_NAMES,
    SIG_OPTIONS,
)

PERSONALITY_FIELDS: Final = ("name", "state", "version", "device", "mount_point")
PERSONALITY_HEADERS: Final = ("NAME", "STATE", "VERSION", "DEVICE", "MOUNT POINT")


def personalities_as_dicts(rows: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    return [dict(zip(PERSONALITY_FIELDS, row, strict=True)) for row in rows]


def conflicts_as_dicts(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [
        {"path": p, "winner": w, "shadowed": list(s), "identical": bool(i)} for p, w, s, i in rows
    ]


def render_list(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "No personalities."
    table = format_table(PERSONALITY_HEADERS, rows)
    return f"{table}\n\n{count(len(rows), 'personality', 'personalities')} listed."


def render_conflicts(rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "No conflicts."
    table = format_table(
        ("PATH", "WINNER", "SHADOWED", "IDENTICAL"),
        [(p, w, ",".join(s), "yes" if i else "no") for p, w, s, i in rows],
    )
    return f"{table}\n\n{count(len(rows), 'conflict', 'conflicts')} listed."


def render_status(
    props: dict[str, Any], rows: Sequence[Sequence[str]], trial: int | None = None
) -> str:
    """hostnamectl-style: right-aligned labels; the live stack bottom to top."""
    by_name = {row[0]: row for row in rows}
    attached: list[str] = list(props.get("Attached", []))
    desired: list[str] = list(props.get("Desired", []))
    fields: list[tuple[str, str]] = []

    if attached:
        stack_rows = []
        for position, name in enumerate(attached, 1):
            row = by_name.get(name, (name, "", "", "", ""))
            stack_rows.append((f"{position}.", name, row[2], row[3], row[4]))
        table = format_table(("", "NAME", "VERSION", "DEVICE", "MOUNT POINT"), stack_rows)
        fields.append(("Stack", "bottom to top\n" + table.split("\n", 1)[1]))
    else:
        fields.append(("Stack", "empty: the base only"))

    not_live = [n for n in desired if n not in attached]
    if not_live:
        fields.append(("Pending", ", ".join(_with_state(n, by_name, "pending") for n in not_live)))
    for state in ("incompatible", "draining", "failed", "available"):
        names = [r[0] for r in rows if r[1] == state and r[0] not in not_live]
        if names:
            fields.append((state.capitalize(), ", ".join(names)))

    writable = str(props.get("WritableDevice", ""))
    if writable == "tmpfs":
        writable = "tmpfs (volatile: changes are lost at reboot)"
    fields.append(("Writable", writable or "none (read-only stack)"))
    fields.append(("Generation", str(props.get("Generation", 0))))
    if trial is not None:
        fields.append(("Trial", trial_notice(trial)))
    conflicts = int(props.get("ConflictCount", 0))
    fields.append(("Conflicts", f"{conflicts} (see '{PROG} conflicts')" if conflicts else "none"))
    for notice in props.get("Notices", []):
        fields.append(("Notice", str(notice)))

    width = max(len(label) for label, _ in fields)
    lines = []
    for label, value in fields:
        first, *rest = value.split("\n")
        lines.append(f"{label.rjust(width)}: {first}")
        lines.extend(" " * (width + 2) + line for line in rest)
    return "\n".join(lines)


def _with_state(name: str, by_name: dict[str, Sequence[str]], usual: str) -> str:
    row = by_name.get(name)
    state = row[1] if row is not None else "no volume"
    return name if state == usual else f"{name} ({state})"


def status_as_dict(
    props: dict[str, Any], rows: Sequence[Sequence[str]], trial: int | None = None
) -> dict[str, Any]:
    return {
        "attached": list(props.get("Attached", [])),
        "desired": list(props.get("Desired", [])),
        "generation": int(props.get("Generation", 0)),
        "trial": trial,
        "conflict_count": int(props.get("ConflictCount", 0)),
        "writable_device": str(props.get("WritableDevice", "")),
        "notices": [str(n) for n in props.get("Notices", [])],
        "personalities": personalities_as_dicts(rows),
    }


# -- verbs --------------------------------------------------------------------------------------


async def verb_list(client: Client, args: argparse.Namespace) -> int:
    (rows,) = await client.call("ListPersonalities")
    if args.json:
        print_json(personalities_as_dicts(rows))
    else:
        print(render_list(rows))
    return 0


async def verb_status(client: Client, args: argparse.Namespace) -> int:
    props = await client.properties()
    (rows,) = await client.call("ListPersonalities")
    trial = await current_trial(client)
    if args.json:
        print_json(status_as_dict(props, rows, trial))
    else:
        print(render_status(props, rows, trial))
    return 0


async def current_trial(client: Client) -> int | None:
    try:
        return on_trial(await read_history(client))
    except CliError as exc:
        if exc.error_name == ERROR_UNKNOWN_METHOD:  # a daemon from before trials
            return None
        raise


async def verb_conflicts(client: Client, args: argparse.Namespace) -> int:
    (rows,) = await client.call("ListConflicts")
    if args.json:
        print_json(conflicts_as_dicts(rows))
    else:
        print(render_conflicts(rows))
    return 0


async def verb_attach(client: Client, args: argparse.Namespace) -> int:
    announce_trial(args)
    (changed,) = await client.call(
        "Attach", "s" + SIG_OPTIONS, [args.name, options_of(args)], timeout=change_timeout(args)
    )
    if args.json:
        print_json(await outcome(client, changed))
    else:
        print(f"Attached {args.name}." if changed else f"{args.name} is already attached.")
    return 0


async def verb_detach(client: Client, args: argparse.Namespace) -> int:
    options = options_of(args)
    if args.from_unit:
        options[OPTION_FROM_UNIT] = Variant("b", True)
    announce_trial(args)
    (changed,) = await client.call(
        "Detach", "s" + SIG_OPTIONS, [args.name, options], timeout=change_timeout(args)
    )
    if args.json:
        print_json(await outcome(client, changed))
    else:
        print(f"Detached {args.name}." if changed else f"{args.name} is not attached.")
    return 0


async def verb_switch(client: Client, args: argparse.Namespace) -> int:
    announce_trial(args)
    (changed,) = await client.call(
        "Switch",
        SIG_NAMES + SIG_OPTIONS,
        [args.names, options_of(args)],
        timeout=change_timeout(args),
    )
    if args.json:
        print_json(await outcome(client, changed))
        return 0
    wanted = " ".join(args.names) if args.names else "the base only"
    print(f"Switched to: {wanted}." if changed else f"Already at: {wanted}.")
    return 0


async def verb_refresh(client: Client, args: argparse.Namespace) -> int:
    before = await client.properties()
    await client.call("Refresh", "", [], timeout=CHANGE_TIMEOUT)
    after = await client.properties()
    changed = after.get("Generation") != before.get("Generation")
    if args.json:
        print_json(await outcome(client, changed))
    elif changed:
        attached = " ".join(after.get("Attached", [])) or "the base only"
        print(f"Refreshed: generation {after.get('Generation')}, {attached}.")
    else:
        print("Refreshed: nothing changed.")
    return 0


DBusVerb = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, int]]


async def run_dbus_verb(verb: DBusVerb, args: argparse.Namespace) -> int:
    client = await Client.connect(args.bus_address)
    try:
        return await verb(client, args)
    finally:
        client.disconnect()


# -- arguments --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show and change the personalities stacked over this system.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--bus-address",
        metavar="ADDRESS",
        help="D-Bus address of the system bus (default: $DBUS_SYSTEM_BUS_ADDRESS, "
        "else the standard system bus)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        dest="global_json",
        help="JSON output: the reading verbs print what they read, the changing verbs their "
        'outcome, and a failure is {"error", "message"} on stdout',
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def reading(name: str, help_: str, verb: DBusVerb) -> None:
        sub = verbs.add_parser(name, help=help_, description=help_)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.set_defaults(dbus_verb=verb)

    reading("list", "List the known personalities and their state.", verb_list)
    reading(
        "status", "Show the live stack, pending personalities and the writable device.", verb_status
    )
    reading(
        "conflicts", "List paths provided by more than one attached personality.", verb_conflicts
    )

    attach = verbs.add_parser(
        "attach",
        help="Attach a personality on top of the stack.",
        description="Attach a personality on top of the stack (nothing to do if it is).",
    )
    attach.add_argument("name", metavar="NAME")
    attach.add_argument(
        "--wait",
        metavar="SEC",
        type=seconds,
        help="wait up to SEC seconds for the personality's volume to appear",
    )
    attach.add_argument(
        "--force", action="store_true", help="attach even if incompatible with the base"
    )
    add_trial_arguments(attach)
    add_json_argument(attach)
    attach.set_defaults(dbus_verb=verb_attach)

    detach = verbs.add_parser(
        "detach",
        help="Detach a personality from the stack.",
        description="Detach a personality from the stack (nothing to do if it is not there).",
    )
    detach.add_argument("name", metavar="NAME")
    detach.add_argument(
        "--from-unit",
        action="store_true",
        help="for the ExecStop of personality@NAME.service: change nothing when the daemon "
        "itself stops that unit or the system shuts down",
    )
    add_trial_arguments(detach)
    add_json_argument(detach)
    detach.set_defaults(dbus_verb=verb_detach)

    switch = verbs.add_parser(
        "switch",
        help="Replace the whole stack, bottom first.",
        description="Replace the desired list with NAME... (bottom first) in one transaction; "
        "no NAME leaves the base only.",
    )
    switch.add_argument("names", metavar="NAME", nargs="*")
    switch.add_argument("--wait", metavar="SEC", type=seconds, help="wait for missing volumes")
    switch.add_argument(
        "--force", action="store_true", help="attach even if incompatible with the base"
    )
    add_trial_arguments(switch)
    add_json_argument(switch)
    switch.set_defaults(dbus_verb=verb_switch)

    refresh = verbs.add_parser(
        "refresh",
        help="Look for volumes and image files again; re-attach updated image files.",
        description="Probe block devices and search paths again, retry volumes that failed, "
        "and re-attach, in one transaction, every attached personality whose image file was "
        "replaced since it was attached.",
    )
    add_json_argument(refresh)
    refresh.set_defaults(dbus_verb=verb_refresh)

    add_history_verbs(verbs)
    add_build_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.global_json:
        args.json = True
    try:
        if hasattr(args, "local_verb"):
            local_verb: Callable[[argparse.Namespace], int] = args.local_verb
            return local_verb(args)
        return asyncio.run(run_dbus_verb(args.dbus_verb, args))
    except UsageError as exc:
        parser.error(str(exc))
    except CliError as exc:
        if args.json:
            print_json(failure_json(exc))
        print(f"{PROG}: {failure_line(args, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
