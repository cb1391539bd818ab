"""Declarations (core/declarations.py): which files count, the commands planned for a change,
and how a base tool is started (adapters/basetools.py, on a tree made in tmp_path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from personalityd.adapters.basetools import BaseTools, ToolUnavailable, elf_runpath
from personalityd.adapters.declarations import read_declarations
from personalityd.core.declarations import (
    LDCONFIG,
    SYSUSERS,
    TMPFILES,
    Declarations,
    is_conf_file,
    is_shared_library,
    plan_runs,
)


def test_library_and_conf_names() -> None:
    assert all(map(is_shared_library, ("libz.so", "libz.so.1", "libz.so.1.2.13", "x.so.0a")))
    assert not any(map(is_shared_library, ("libz.a", "libz.so-old/", "libz.sox", "so.1")))
    assert is_conf_file("web.conf") and not is_conf_file(".hidden.conf")
    assert not is_conf_file("web.conf.dpkg-old") and not is_conf_file("web")


def test_users_first_then_tmpfiles_then_one_ldconfig() -> None:
    web = Declarations("web", sysusers=("web.conf",), tmpfiles=("web.conf",), libraries=True)
    db = Declarations("db", sysusers=("db.conf", "mysql.conf"), libraries=True)
    runs = plan_runs("/", [web, db], libraries_left=False)
    assert [(r.tool, r.personality) for r in runs] == [
        (SYSUSERS, "web"),
        (SYSUSERS, "db"),
        (TMPFILES, "web"),
        (LDCONFIG, "web db"),
    ]
    assert runs[1].args == ("/usr/lib/sysusers.d/db.conf", "/usr/lib/sysusers.d/mysql.conf")
    assert runs[2].args == ("--create", "/usr/lib/tmpfiles.d/web.conf")
    assert runs[3].args == ("-X",)


def test_a_sandbox_root_is_passed_to_every_tool() -> None:
    web = Declarations("web", sysusers=("web.conf",), tmpfiles=("t.conf",))
    runs = plan_runs("/srv/root", [web], libraries_left=True)
    assert [r.args for r in runs] == [
        ("--root=/srv/root", "/srv/root/usr/lib/sysusers.d/web.conf"),
        ("--create", "--root=/srv/root", "/srv/root/usr/lib/tmpfiles.d/t.conf"),
        ("-X", "-r", "/srv/root"),
    ]
    assert runs[2].personality == ""  # for the ones that left
    assert plan_runs("/", [Declarations("empty")], libraries_left=False) == []


def test_only_regular_conf_files_and_libraries_in_library_dirs_count(tmp_path: Path) -> None:
    tree = tmp_path / "web"
    (tree / "usr/lib/sysusers.d").mkdir(parents=True)
    (tree / "usr/lib/sysusers.d/web.conf").write_text("u web -\n")
    (tree / "usr/lib/sysusers.d/masked.conf").symlink_to("/dev/null")
    (tree / "usr/lib/sysusers.d/notes.txt").write_text("")
    (tree / "usr/share/web").mkdir(parents=True)
    (tree / "usr/share/web/libhidden.so.1").write_text("")  # not a library directory
    found = read_declarations("web", str(tree), "x86_64-linux-gnu")
    assert found == Declarations("web", sysusers=("web.conf",))

    (tree / "usr/lib/x86_64-linux-gnu").mkdir()
    (tree / "usr/lib/x86_64-linux-gnu/libweb.so.1").write_text("")
    assert read_declarations("web", str(tree), "x86_64-linux-gnu").libraries
    shutil.rmtree(tree / "usr/lib/x86_64-linux-gnu")
    (tree / "etc/ld.so.conf.d").mkdir(parents=True)
    (tree / "etc/ld.so.conf.d/web.conf").write_text("/opt/web/lib\n")
    assert read_declarations("web", str(tree), "x86_64-linux-gnu").libraries


def test_a_dynamic_tool_runs_through_the_base_interpreter_with_its_runpath() -> None:
    program = shutil.which("systemd-tmpfiles")
    assert program is not None
    tools = BaseTools({}, "x86_64-linux-gnu")
    argv = tools.command(["/nonexistent/systemd-tmpfiles", program], ["--help"])
    assert os.path.basename(argv[0]).startswith("ld-linux")
    assert argv[1:3] == ["--inhibit-cache", "--library-path"]
    runpath = elf_runpath(program)
    assert runpath and argv[3].split(":")[0] == os.path.realpath(runpath[0])
    assert argv[4:] == [os.path.realpath(program), "--help"]
    assert tools.run([program], ["--version"]).output.startswith("systemd ")


def test_scripts_and_missing_programs_are_not_run(tmp_path: Path) -> None:
    script = tmp_path / "ldconfig"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    with pytest.raises(ToolUnavailable, match="not an ELF executable"):
        BaseTools({}, "").command([str(script), str(tmp_path / "none")], [])


def test_paths_below_a_stacked_hierarchy_come_from_its_base_reference(tmp_path: Path) -> None:
    stacked, reference = tmp_path / "usr", tmp_path / "base_usr"
    for top, content in ((stacked, "#!/bin/sh\n"), (reference, None)):
        (top / "bin").mkdir(parents=True)
        if content is not None:
            (top / "bin/tool").write_text(content)
    shutil.copy(shutil.which("true") or "/bin/true", reference / "bin/tool")
    tools = BaseTools({str(stacked): str(reference)}, "")
    argv = tools.command([f"{stacked}/bin/tool"], ["x"])
    assert argv[-2:] == [f"{reference}/bin/tool", "x"]
