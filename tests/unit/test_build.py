"""personalityctl build without a bus: the manifest it writes, the source trees it takes, how
its command line maps to an image spec (the image itself: frontends/test_personalityctl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.client import build, buildverb, cli
from personalityd.client.build import BuildError, ImageSpec
from personalityd.core.osrelease import parse_os_release

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
    monkeypatch.setattr(buildverb, "build_image", rec)
    base = {"ID": "debian", "VERSION_ID": "12"}
    monkeypatch.setattr(buildverb, "read_base_os_release", lambda: base)
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
