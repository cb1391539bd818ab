"""personalityctl without a bus: arguments, output formatting, and build's pure parts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from personalityd.client import build, cli
from personalityd.client.build import BuildError, ImageSpec
from personalityd.core.osrelease import parse_os_release

VERBS = ("list", "status", "attach", "detach", "switch", "conflicts", "build")


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
        ["attach", "web", "--json"],
        ["--json", "attach", "web"],
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


def test_json_is_accepted_before_or_after_a_reading_verb() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["list", "--json"]).json
    assert parser.parse_args(["--json", "status"]).global_json
    assert not parser.parse_args(["conflicts"]).json


def test_wait_and_force_map_to_typed_options() -> None:
    assert cli.change_options() == {}
    options = cli.change_options(wait=30, force=True)
    assert options["timeout"].signature == "u"
    assert options["timeout"].value == 30
    assert options["force"] == Variant("b", True)
    assert cli.change_options(wait=0) == {"timeout": Variant("u", 0)}


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
    text = cli.format_table(("name", "state"), [("a-long-name", "x"), ("b", "")])
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


# -- build: manifest --------------------------------------------------------------------------


def test_manifest_text() -> None:
    spec = ImageSpec(
        name="web",
        os_id="debian",
        version_id="12",
        image_version="2.1",
        description='Web stack: nginx + "php"',
        services=("nginx.service", "php-fpm@8.2.service"),
    )
    assert build.manifest_text(spec) == (
        "ID=debian\n"
        "VERSION_ID=12\n"
        "IMAGE_VERSION=2.1\n"
        'PERSONALITY_DESCRIPTION="Web stack: nginx + \\"php\\""\n'
        'PERSONALITY_SERVICES="nginx.service php-fpm@8.2.service"\n'
    )
    assert build.manifest_path("web") == "usr/lib/extension-release.d/extension-release.web"


def test_manifest_text_minimal() -> None:
    assert build.manifest_text(ImageSpec(name="x")) == "ID=_any\n"


@given(st.text(alphabet=st.characters(min_codepoint=0x20, exclude_characters="\x7f")))
def test_quoted_values_read_back(value: str) -> None:
    fields = parse_os_release(f"KEY={build.quote_value(value)}\n")
    assert fields["KEY"] == value


def test_manifest_reads_back_with_the_daemons_parser() -> None:
    spec = ImageSpec(name="t", os_id="debian", description="costs $5 `now` \\ here")
    assert parse_os_release(build.manifest_text(spec))["PERSONALITY_DESCRIPTION"] == (
        "costs $5 `now` \\ here"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ImageSpec(name="../x"), "invalid personality name"),
        (ImageSpec(name=""), "invalid personality name"),
        (ImageSpec(name="a" * 65), "invalid personality name"),
        (ImageSpec(name="x", os_id="Debian"), "invalid ID"),
        (ImageSpec(name="x", version_id="12 beta"), "invalid VERSION_ID"),
        (ImageSpec(name="x", image_version="1\n2"), "invalid IMAGE_VERSION"),
        (ImageSpec(name="x", description="two\nlines"), "one line"),
        (ImageSpec(name="x", services=("nginx",)), "invalid unit name"),
        (ImageSpec(name="x", services=("a;b.service",)), "invalid unit name"),
    ],
)
def test_bad_specs_are_refused(spec: ImageSpec, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build.check_spec(spec)


def test_base_identity() -> None:
    assert build.base_identity({"ID": "debian", "VERSION_ID": "12"}) == ("debian", "12")
    assert build.base_identity({"ID": "arch"}) == ("arch", "")
    assert build.base_identity({}) == ("_any", "")


def test_erofs_label_only_when_it_fits() -> None:
    assert build.erofs_label("abc") == "personality-abc"
    assert build.erofs_label("abcd") is None


# -- build: source tree -------------------------------------------------------------------------


def make_tree(root: Path, *files: str) -> Path:
    root.mkdir()
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    return root


@pytest.mark.parametrize("hierarchy", ["usr/bin/tool", "etc/tool.conf", "opt/tool/bin/tool"])
def test_trees_with_a_hierarchy_are_accepted(tmp_path: Path, hierarchy: str) -> None:
    build.check_source_tree(make_tree(tmp_path / "src", hierarchy))


@pytest.mark.parametrize("os_release", ["usr/lib/os-release", "etc/os-release"])
def test_whole_os_trees_are_refused(tmp_path: Path, os_release: str) -> None:
    src = make_tree(tmp_path / "src", "usr/bin/tool", os_release)
    with pytest.raises(BuildError, match=f"has {os_release}: it looks like a whole OS tree"):
        build.check_source_tree(src)


def test_trees_without_hierarchies_are_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "bin/tool", "README")
    with pytest.raises(BuildError, match="none of the top-level directories usr/, etc/, opt/"):
        build.check_source_tree(src)


def test_a_symlinked_hierarchy_does_not_count(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "real/bin/tool")
    (src / "usr").symlink_to("real")
    with pytest.raises(BuildError, match="none of the top-level directories"):
        build.check_source_tree(src)


def test_trees_with_a_manifest_are_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "usr/lib/extension-release.d/extension-release.other")
    with pytest.raises(BuildError, match="already has a manifest"):
        build.check_source_tree(src)


def test_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a directory"):
        build.check_source_tree(tmp_path / "nothing")


# -- build: from the command line ---------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path, ImageSpec, str]] = []

    def __call__(self, source: Path, output: Path, spec: ImageSpec, fmt: str) -> None:
        self.calls.append((source, output, spec, fmt))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(cli, "build_image", rec)
    monkeypatch.setattr(cli, "read_base_os_release", lambda: {"ID": "debian", "VERSION_ID": "12"})
    return rec


def test_build_takes_id_and_version_id_from_the_base(recorder: Recorder) -> None:
    assert cli.main(["build", "src", "--name", "web", "-o", "web.raw"]) == 0
    ((source, output, spec, fmt),) = recorder.calls
    assert (source, output, fmt) == (Path("src"), Path("web.raw"), "squashfs")
    assert (spec.name, spec.os_id, spec.version_id) == ("web", "debian", "12")


def test_build_options_map_to_the_manifest(recorder: Recorder) -> None:
    argv = [
        "build", "src", "--name", "web", "-o", "web.erofs", "--format", "erofs",
        "--version", "2.1", "--description", "Web stack",
        "--services", "a.service,b.socket c.timer",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    ((_, _, spec, fmt),) = recorder.calls
    assert fmt == "erofs"
    assert spec.image_version == "2.1"
    assert spec.description == "Web stack"
    assert spec.services == ("a.service", "b.socket", "c.timer")


def test_build_with_another_id_takes_no_version_from_the_base(recorder: Recorder) -> None:
    assert cli.main(["build", "src", "--name", "w", "-o", "i", "--id", "fedora"]) == 0
    assert (recorder.calls[0][2].os_id, recorder.calls[0][2].version_id) == ("fedora", "")
    assert (
        cli.main(["build", "src", "--name", "w", "-o", "i", "--id", "_any", "--version-id", "1"])
        == 0
    )
    assert (recorder.calls[1][2].os_id, recorder.calls[1][2].version_id) == ("_any", "1")
    assert cli.main(["build", "src", "--name", "w", "-o", "i", "--version-id", "13"]) == 0
    assert (recorder.calls[2][2].os_id, recorder.calls[2][2].version_id) == ("debian", "13")


def test_build_failure_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_tree(tmp_path / "src", "usr/bin/tool", "etc/os-release")
    code = cli.main(["build", str(src), "--name", "web", "-o", str(tmp_path / "web.raw")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"personalityctl: {src} has etc/os-release")
    assert not (tmp_path / "web.raw").exists()


def test_build_refuses_an_invalid_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src", "usr/bin/tool")
    assert cli.main(["build", str(src), "--name", "../x", "-o", str(tmp_path / "i")]) == 1
    assert capsys.readouterr().err.startswith("personalityctl: invalid personality name '../x'")


def test_namespace_has_what_the_verbs_need() -> None:
    args = cli.build_parser().parse_args(["attach", "web", "--wait", "5", "--force"])
    assert isinstance(args, argparse.Namespace)
    assert (args.name, args.wait, args.force) == ("web", 5, True)
    assert args.dbus_verb is cli.verb_attach
