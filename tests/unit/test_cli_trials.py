"""personalityctl's trial, rollback and history side without a bus: arguments, options, call
timeouts, rendering and the JSON shapes (the verbs against the daemon: the integration tests)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Variant

from personalityd.client import changes, cli, history
from personalityd.client.connection import CliError
from personalityd.client.history import Entry

ROLLED_BACK = "org.personalityd.personality1.Error.RolledBack"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


# -- arguments ----------------------------------------------------------------------------------


def test_rollback_and_confirm_default_to_generation_0() -> None:
    args = parse("rollback")
    assert (args.generation, args.data, args.wait, args.force) == (0, False, None, False)
    assert (args.confirm, args.confirm_mode, args.json) == (None, None, False)
    assert args.dbus_verb is history.verb_rollback
    assert parse("confirm").generation == 0
    assert parse("confirm", "8").generation == 8
    assert parse("confirm").dbus_verb is history.verb_confirm
    assert parse("history").dbus_verb is history.verb_history


def test_rollback_takes_every_option() -> None:
    args = parse(
        "rollback", "5", "--data", "--confirm", "60", "--confirm-mode", "manual",
        "--wait", "10", "--force", "--json",
    )  # fmt: skip
    assert (args.generation, args.data, args.confirm, args.confirm_mode) == (5, True, 60, "manual")
    assert (args.wait, args.force, args.json) == (10, True, True)


@pytest.mark.parametrize("verb", [["attach", "web"], ["detach", "web"], ["switch", "a", "b"]])
def test_changing_verbs_take_a_trial_and_json(verb: list[str]) -> None:
    args = parse(*verb, "--confirm", "30", "--confirm-mode", "auto", "--json")
    assert (args.confirm, args.confirm_mode, args.json) == (30, "auto", True)
    assert parse("--json", *verb).global_json


@pytest.mark.parametrize(
    "argv",
    [
        ["rollback", "-1"],
        ["rollback", "soon"],
        ["rollback", str(2**64)],
        ["rollback", "1", "2"],
        ["rollback", "--confirm", "-5"],
        ["rollback", "--confirm", str(2**32)],
        ["switch", "web", "--confirm-mode", "maybe"],
        ["attach", "web", "--confirm", "1.5"],
        ["confirm", "x"],
        ["confirm", "--data"],
        ["history", "3"],
        ["history", "--confirm", "5"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_largest_generation_is_accepted() -> None:
    assert parse("rollback", str(2**64 - 1)).generation == 2**64 - 1


# -- options and timeouts -----------------------------------------------------------------------


def test_options_have_the_contract_signatures() -> None:
    options = changes.options_of(
        parse("rollback", "3", "--data", "--confirm", "0", "--confirm-mode", "manual", "--force")
    )
    assert options == {
        "force": Variant("b", True),
        "confirm": Variant("u", 0),
        "confirm_mode": Variant("s", "manual"),
        "data": Variant("b", True),
    }
    # Nothing asked, nothing sent: the daemon's configured trial length applies.
    assert changes.options_of(parse("switch", "web")) == {}
    assert changes.options_of(parse("detach", "web")) == {}
    assert changes.options_of(parse("attach", "web", "--confirm", "60")) == {
        "confirm": Variant("u", 60)
    }


def test_call_timeout_grows_with_the_wait_and_the_trial() -> None:
    base = changes.CHANGE_TIMEOUT
    assert changes.change_timeout(parse("switch", "web")) == base
    assert changes.change_timeout(parse("switch", "web", "--wait", "30")) == base + 30
    assert changes.change_timeout(parse("switch", "web", "--confirm", "600")) == base + 600
    assert changes.change_timeout(parse("attach", "w", "--wait", "5", "--confirm", "60")) == (
        base + 65
    )
    assert changes.change_timeout(parse("detach", "w", "--confirm", "60")) == base + 60
    assert changes.change_timeout(parse("rollback", "--wait", "1", "--confirm", "2")) == base + 3


# -- failures -----------------------------------------------------------------------------------


def test_a_rollback_names_the_change_it_undid() -> None:
    reason = (
        "the trial of generation 8 failed (nginx.service: exit-code); "
        "generation 9 has the stack of generation 7"
    )
    exc = CliError(reason, ROLLED_BACK)
    assert (
        changes.failure_line(parse("switch", "web2"), exc) == f"switch web2: rolled back: {reason}"
    )
    assert changes.failure_line(parse("attach", "web"), exc).startswith("attach web: rolled back: ")
    assert changes.failure_line(parse("rollback", "5"), exc).startswith("rollback 5: rolled back")
    assert changes.failure_line(parse("rollback"), exc).startswith("rollback: rolled back: ")
    already = CliError("rolled back: deadline", ROLLED_BACK)
    assert changes.failure_line(parse("switch"), already) == "switch: rolled back: deadline"
    # The daemon's own words, when they say it, are not repeated.
    daemon = (
        "generation 8 was rolled back (nginx.service: exit-code); "
        "generation 9 has the stack of generation 7"
    )
    assert changes.failure_line(parse("switch", "web2"), CliError(daemon, ROLLED_BACK)) == (
        f"switch web2: {daemon}"
    )
    other = CliError("no personality named 'web2'", "org.personalityd.personality1.Error.Nope")
    assert changes.failure_line(parse("switch", "web2"), other) == "no personality named 'web2'"


def test_failure_json_has_the_error_name_and_the_daemons_message() -> None:
    exc = CliError("cannot reach personalityd on the system bus: x", "a.b.C", message="x")
    assert changes.failure_json(exc) == {"error": "a.b.C", "message": "x"}
    assert changes.failure_json(CliError("y")) == {
        "error": "org.freedesktop.DBus.Error.Failed",
        "message": "y",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["switch", "web", "--json"],
        ["--json", "attach", "web"],
        ["rollback", "--json"],
        ["confirm", "--json"],
        ["history", "--json"],
        ["status", "--json"],
    ],
)
def test_json_failure_on_stdout_and_one_line_on_stderr(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--bus-address", f"unix:path={tmp_path}/no-bus", *argv])
    assert code == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["error"] == "org.freedesktop.DBus.Error.NoServer"
    assert data["message"].startswith("cannot reach personalityd on the system bus: ")
    assert captured.err.splitlines() == [f"personalityctl: {data['message']}"]


# -- history ------------------------------------------------------------------------------------


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


T0 = 1_796_216_400_000_000  # 2026-12-02 13:00:00 UTC, in usec
ROWS = [
    (5, ["base", "web"], T0, "confirmed", "dbus"),
    (6, [], T0 + 61_000_000, "confirmed", "spool"),
    (7, ["base", "web2"], T0 + 3_600_000_000, "rolled-back", "dbus"),
    (8, ["base", "web"], T0 + 3_601_500_000, "confirmed", "rollback"),
    (9, ["base", "web3"], T0 + 7_200_000_000, "trial", "dbus"),
]


def test_history_table(utc: None) -> None:
    text = history.render_history(history.entries(ROWS), current=9)
    lines = text.splitlines()
    assert lines[0].split() == ["GENERATION", "TIME", "STATUS", "CAUSE", "DESIRED"]
    assert lines[1].split() == ["5", "2026-12-02", "13:00:00", "confirmed", "dbus", "base", "web"]
    assert lines[2].split() == [
        "6",
        "2026-12-02",
        "13:01:01",
        "confirmed",
        "spool",
        "(base",
        "only)",
    ]
    assert lines[4].split()[4:] == ["rollback", "base", "web"]
    assert lines[5].split() == [
        "9", "(current)", "2026-12-02", "15:00:00", "trial", "dbus", "base", "web3",
    ]  # fmt: skip
    assert lines[-2:] == ["", "5 generations kept."]
    # Aligned: every row's TIME starts under the header's.
    column = lines[0].index("TIME")
    assert all(line[column - 1] == " " and line[column] != " " for line in lines[1:6])


def test_history_time_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert history.local_time(T0) == "2026-12-02 18:30:00"
        assert history.iso_time(T0) == "2026-12-02T18:30:00+05:30"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_history_of_nothing() -> None:
    assert history.render_history([], current=0) == "No generations."
    assert history.render_history(history.entries(ROWS[:1]), 5).endswith("\n1 generation kept.")


def test_history_json_shape(utc: None) -> None:
    data = history.history_as_dicts(history.entries(ROWS), current=9)
    assert data[0] == {
        "generation": 5,
        "desired": ["base", "web"],
        "time": "2026-12-02T13:00:00+00:00",
        "realtime_usec": T0,
        "status": "confirmed",
        "cause": "dbus",
        "current": False,
    }
    assert [d["current"] for d in data] == [False, False, False, False, True]
    assert data[1]["desired"] == []
    json.dumps(data)


def test_the_trial_is_found() -> None:
    assert history.on_trial(history.entries(ROWS)) == 9
    assert history.on_trial(history.entries(ROWS[:4])) is None
    assert history.on_trial([]) is None


def test_rollback_target_is_the_daemons_choice() -> None:
    entries = history.entries(ROWS)
    target = history.rollback_target(entries, current=9, requested=0)
    assert target is not None and target.generation == 8  # the newest confirmed before 9
    # cd -: after a rollback to 6 as generation 10, the next Rollback(0) returns to 8's stack.
    flipped = [*entries, Entry(10, (), T0 + 9_000_000_000, "confirmed", "rollback")]
    target = history.rollback_target(flipped, current=10, requested=0)
    assert target is not None and target.generation == 8
    target = history.rollback_target(entries, current=9, requested=7)
    assert target is not None and target.desired == ("base", "web2")
    assert history.rollback_target(entries, current=9, requested=42) is None
    assert history.rollback_target(entries[:1], current=5, requested=0) is None


# -- status -------------------------------------------------------------------------------------


PROPS = {
    "Attached": ["base", "web3"],
    "Desired": ["base", "web3"],
    "Generation": 9,
    "ConflictCount": 0,
    "WritableDevice": "/dev/vdb",
}


def test_status_says_the_generation_is_on_trial() -> None:
    text = cli.render_status(PROPS, [], trial=9)
    lines = text.splitlines()
    trial = next(line for line in lines if line.lstrip().startswith("Trial:"))
    assert trial.split(": ", 1)[1] == (
        "generation 9 is on trial: 'personalityctl confirm' keeps it, "
        "'personalityctl rollback' undoes it"
    )
    generation = next(i for i, line in enumerate(lines) if "Generation:" in line)
    assert lines[generation + 1] == trial
    assert len({line.index(":") for line in lines if not line.startswith("      ")}) == 1
    assert "Trial" not in cli.render_status(PROPS, [])


def test_status_json_has_the_trial() -> None:
    assert cli.status_as_dict(PROPS, [], trial=9)["trial"] == 9
    assert cli.status_as_dict(PROPS, [])["trial"] is None


# -- the outcome of a change --------------------------------------------------------------------


def test_outcome_shape() -> None:
    assert changes.outcome_of({**PROPS, "ConflictCount": 3}, True) == {
        "changed": True,
        "generation": 9,
        "attached": ["base", "web3"],
        "conflicts": 3,
    }
    assert changes.outcome_of({}, False) == {
        "changed": False,
        "generation": 0,
        "attached": [],
        "conflicts": 0,
    }


def test_describe_names_the_command() -> None:
    assert changes.describe(parse("switch", "base", "web2")) == "switch base web2"
    assert changes.describe(parse("switch")) == "switch"
    assert changes.describe(parse("detach", "web", "--confirm", "5")) == "detach web"
    assert changes.describe(parse("rollback", "7", "--data")) == "rollback 7"
