"""personalityctl without a bus: arguments and output formatting (build: test_build.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from personalityd.client import changes, cli, output

VERBS = (
    "list", "status", "attach", "detach", "switch", "conflicts", "refresh", "build",
    "history", "rollback", "confirm",
)  # fmt: skip


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: personalityctl {verb}" in capsys.readouterr().out


def test_top_level_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    assert "--bus-address" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["attach"],
        ["attach", "web", "--wait", "soon"],
        ["attach", "web", "--wait", "-1"],
        ["attach", "web", "--wait", str(2**32)],
        ["detach"],
        ["detach", "web", "--force"],
        ["list", "extra"],
        ["build", "dir"],
        ["build", "dir", "--name", "x"],
        ["build", "dir", "--name", "x", "-o", "img", "--format", "ext4"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_json_is_accepted_before_or_after_any_verb() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["list", "--json"]).json
    assert parser.parse_args(["--json", "status"]).global_json
    assert not parser.parse_args(["conflicts"]).json
    assert parser.parse_args(["attach", "web", "--json"]).json
    assert parser.parse_args(["--json", "detach", "web"]).global_json
    assert parser.parse_args(["refresh", "--json"]).json


def test_wait_and_force_map_to_typed_options() -> None:
    assert changes.change_options() == {}
    options = changes.change_options(wait=30, force=True)
    assert options["timeout"].signature == "u"
    assert options["timeout"].value == 30
    assert options["force"] == Variant("b", True)
    assert changes.change_options(wait=0) == {"timeout": Variant("u", 0)}


def test_unreachable_bus_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--bus-address", f"unix:path={tmp_path}/no-bus", "list"])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("personalityctl: cannot reach personalityd on the system bus: ")
    assert "Traceback" not in captured.err


# -- output -------------------------------------------------------------------------------------


ROWS = [
    ("base-tools", "attached", "1.0", "/dev/loop3", "/opt/personality/base-tools"),
    ("web", "attached", "2.1", "/dev/loop4", "/opt/personality/web"),
    ("datascience", "pending", "", "", ""),
    ("old", "incompatible", "0.9", "/dev/loop5", ""),
]


def test_table_is_aligned_with_an_upper_case_header() -> None:
    text = output.format_table(("name", "state"), [("a-long-name", "x"), ("b", "")])
    assert text.splitlines() == ["NAME        STATE", "a-long-name x", "b           -"]


def test_list_output() -> None:
    lines = cli.render_list(ROWS).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "VERSION", "DEVICE", "MOUNT", "POINT"]
    assert lines[0].index("STATE") == lines[1].index("attached")
    assert lines[3].split() == ["datascience", "pending", "-", "-", "-"]
    assert lines[-2:] == ["", "4 personalities listed."]
    assert all(line == line.rstrip() for line in lines)


def test_list_output_counts() -> None:
    assert cli.render_list([]) == "No personalities."
    assert cli.render_list(ROWS[:1]).endswith("\n1 personality listed.")


def test_list_json_shape() -> None:
    assert cli.personalities_as_dicts(ROWS[:1]) == [
        {
            "name": "base-tools",
            "state": "attached",
            "version": "1.0",
            "device": "/dev/loop3",
            "mount_point": "/opt/personality/base-tools",
        }
    ]


def test_conflicts_output() -> None:
    rows = [("/usr/bin/tool", "web", ["datascience", "base-tools"], False)]
    lines = cli.render_conflicts(rows).splitlines()
    assert lines[0].split() == ["PATH", "WINNER", "SHADOWED", "IDENTICAL"]
    assert lines[1].split() == ["/usr/bin/tool", "web", "datascience,base-tools", "no"]
    assert lines[-1] == "1 conflict listed."
    assert cli.render_conflicts([]) == "No conflicts."
    assert cli.conflicts_as_dicts(rows) == [
        {
            "path": "/usr/bin/tool",
            "winner": "web",
            "shadowed": ["datascience", "base-tools"],
            "identical": False,
        }
    ]


PROPS: dict[str, Any] = {
    "Attached": ["base-tools", "web"],
    "Desired": ["base-tools", "web", "datascience"],
    "Generation": 7,
    "ConflictCount": 2,
    "WritableDevice": "/dev/vdb",
}


def test_status_output() -> None:
    text = cli.render_status(PROPS, ROWS)
    lines = text.splitlines()
    assert lines[0].endswith("Stack: bottom to top")
    # The stack, bottom first, aligned under the value column.
    assert lines[1].split() == [
        "1.",
        "base-tools",
        "1.0",
        "/dev/loop3",
        "/opt/personality/base-tools",
    ]
    assert lines[2].split()[:2] == ["2.", "web"]
    values = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[3:]}
    assert values == {
        "Pending": "datascience",
        "Incompatible": "old",
        "Writable": "/dev/vdb",
        "Generation": "7",
        "Conflicts": "2 (see 'personalityctl conflicts')",
    }
    colons = {line.index(":") for line in lines if not line.startswith(" " * 14)}
    assert len(colons) == 1  # labels right-aligned


def test_status_output_of_an_empty_system() -> None:
    props = {**PROPS, "Attached": [], "Desired": [], "WritableDevice": "", "ConflictCount": 0}
    text = cli.render_status(props, [])
    assert "Stack: empty: the base only" in text
    assert "Writable: none (read-only stack)" in text
    assert "Conflicts: none" in text
    assert "Pending" not in text


def test_status_shows_why_a_desired_personality_is_not_live() -> None:
    props = {**PROPS, "Attached": [], "Desired": ["old", "gone"]}
    text = cli.render_status(props, ROWS)
    assert "Pending: old (incompatible), gone (no volume)" in text


def test_status_json_shape() -> None:
    data = cli.status_as_dict(PROPS, ROWS)
    assert data["attached"] == ["base-tools", "web"]
    assert data["desired"] == ["base-tools", "web", "datascience"]
    assert (data["generation"], data["conflict_count"]) == (7, 2)
    assert data["writable_device"] == "/dev/vdb"
    assert len(data["personalities"]) == 4


def test_namespace_has_what_the_verbs_need() -> None:
    args = cli.build_parser().parse_args(["attach", "web", "--wait", "5", "--force"])
    assert isinstance(args, argparse.Namespace)
    assert (args.name, args.wait, args.force) == ("web", 5, True)
    assert args.dbus_verb is cli.verb_attach
