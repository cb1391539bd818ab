"""What the changing verbs share: their a{sv} options, the call timeout (which grows with a
trial, since the daemon answers when the trial ends), the outcome printed with --json, and
the line a failure prints."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from dbus_fast import Variant

from personalityd.client.connection import Client, CliError
from personalityd.client.output import PROG
from personalityd.core.errors import ERROR_PREFIX
from personalityd.core.names import (
    OPTION_CONFIRM,
    OPTION_CONFIRM_MODE,
    OPTION_DATA,
    OPTION_FORCE,
    OPTION_TIMEOUT,
)

CHANGE_TIMEOUT: Final = 120.0  # seconds for a stack change, on top of --wait and --confirm
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
CONFIRM_MODES: Final = ("auto", "manual")
ERROR_ROLLED_BACK: Final = ERROR_PREFIX + "RolledBack"


def seconds(text: str) -> int:
    """An argparse type: whole seconds that fit the daemon's `u`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 0 <= value <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f"out of range: {text}")
    return value


def generation(text: str) -> int:
    """An argparse type: a generation number (`t`); 0 lets the daemon choose."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a generation number: {text!r}") from None
    if not 0 <= value <= UINT64_MAX:
        raise argparse.ArgumentTypeError(f"out of range: {text}")
    return value


def change_options(
    wait: int | None = None,
    force: bool = False,
    confirm: int | None = None,
    confirm_mode: str | None = None,
    data: bool = False,
) -> dict[str, Variant]:
    """The a{sv} options of a change; keys only for what was asked, so that the daemon's
    configured defaults (a trial length, say) apply to the rest."""
    options: dict[str, Variant] = {}
    if wait is not None:
        options[OPTION_TIMEOUT] = Variant("u", wait)
    if force:
        options[OPTION_FORCE] = Variant("b", True)
    if confirm is not None:
        options[OPTION_CONFIRM] = Variant("u", confirm)
    if confirm_mode is not None:
        options[OPTION_CONFIRM_MODE] = Variant("s", confirm_mode)
    if data:
        options[OPTION_DATA] = Variant("b", True)
    return options


def options_of(args: argparse.Namespace) -> dict[str, Variant]:
    return change_options(
        getattr(args, "wait", None),
        getattr(args, "force", False),
        getattr(args, "confirm", None),
        getattr(args, "confirm_mode", None),
        getattr(args, "data", False),
    )


def change_timeout(args: argparse.Namespace) -> float:
    """How long to wait for the answer: the change itself, the volumes it may wait for, and
    the trial, whose end is when the daemon answers."""
    wait = getattr(args, "wait", None) or 0
    return CHANGE_TIMEOUT + wait + (getattr(args, "confirm", None) or 0)


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--confirm",
        metavar="SEC",
        type=seconds,
        help="make the new generation a trial of SEC seconds: it is kept once its services "
        "are active and its health checks passed, else rolled back (0: no trial; default: "
        "the daemon's transactions.confirm_timeout). The command waits for the outcome",
    )
    parser.add_argument(
        "--confirm-mode",
        choices=CONFIRM_MODES,
        help=f"manual: the trial also needs '{PROG} confirm' before its deadline (default: auto)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the outcome (or the error) as JSON on stdout",
    )


def announce_trial(args: argparse.Namespace) -> None:
    """Tell someone watching why the command does not return yet."""
    confirm = getattr(args, "confirm", None)
    manual = getattr(args, "confirm_mode", None) == "manual"
    if not (confirm or manual) or not sys.stderr.isatty():
        return
    length = f" (up to {confirm}s)" if confirm else ""
    how = f"; confirm it with '{PROG} confirm' from another shell" if manual else ""
    print(f"{PROG}: waiting for the end of the trial{length}{how}", file=sys.stderr, flush=True)


async def outcome(client: Client, changed: bool) -> dict[str, Any]:
    """The `--json` answer of a change that succeeded, from the properties after it."""
    return outcome_of(await client.properties(), changed)


def outcome_of(props: dict[str, Any], changed: bool) -> dict[str, Any]:
    return {
        "changed": bool(changed),
        "generation": int(props.get("Generation", 0)),
        "attached": list(props.get("Attached", [])),
        "conflicts": int(props.get("ConflictCount", 0)),
    }


def describe(args: argparse.Namespace) -> str:
    """The command in a few words: `switch web2`, `rollback 5`, `attach web`."""
    words = [str(args.verb)]
    if getattr(args, "name", None) is not None:
        words.append(str(args.name))
    words.extend(str(n) for n in getattr(args, "names", None) or ())
    if getattr(args, "generation", None):
        words.append(str(args.generation))
    return " ".join(words)


def failure_line(args: argparse.Namespace, exc: CliError) -> str:
    """The line after `personalityctl: `. A rollback names what was undone: the change
    itself succeeded, so the daemon's reason alone would not say which one failed."""
    if exc.error_name != ERROR_ROLLED_BACK:
        return str(exc)
    reason = str(exc)
    if "rolled back" not in reason.lower():
        reason = f"rolled back: {reason}"
    return f"{describe(args)}: {reason}"


def failure_json(exc: CliError) -> dict[str, str]:
    return {"error": exc.error_name, "message": exc.message}
