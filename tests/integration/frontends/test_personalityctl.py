"""personalityctl run as a user runs it, against a private system bus and an in-memory manager.

The bus, the manager and the service are the fixtures of frontends/conftest.py. (Named
apart from tests/unit/test_cli.py: the test directories are not packages, so two test modules
may not share a base name.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from bus_clients import Result
from dbus_fast.aio import MessageBus
from memory_manager import EXPLODING_NAME, SECRET_TEXT, FakeVolume, MemoryManager

import personalityd
from personalityd.client.build import read_base_os_release
from personalityd.core.model import Conflict
from testkit.contract import BUS

PACKAGE_DIR = str(Path(personalityd.__file__).resolve().parents[1])
UNREACHABLE = "personalityctl: cannot reach personalityd on the system bus: "


def cli_env(extra: Mapping[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_DIR, env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


async def ctl(*argv: str, env: Mapping[str, str] | None = None) -> Result:
    """`personalityctl ARGV...` as a subprocess, while this loop keeps serving the bus."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "personalityd.client.cli", *argv,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else cli_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def ctl_sync(*argv: str) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", *argv],
        capture_output=True, text=True, env=cli_env(), timeout=300, check=False,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


# -- reading verbs ------------------------------------------------------------------------------


async def test_list(served: MessageBus, manager: MemoryManager) -> None:
    result = await ctl("list")
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "VERSION", "DEVICE", "MOUNT", "POINT"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["old", "incompatible", "0.9"],
        ["tools", "available", "1.0"],
        ["web", "available", "2.1"],
    ]
    assert lines[4:] == ["", "3 personalities listed."]
    assert result.err == ""


async def test_list_json(served: MessageBus) -> None:
    for argv in (("list", "--json"), ("--json", "list")):
        result = await ctl(*argv)
        assert result.rc == 0, result.err
        data = json.loads(result.out)
        assert data[2] == {
            "name": "web",
            "state": "available",
            "version": "2.1",
            "device": "/dev/loop10",
            "mount_point": "",
        }


async def test_status(served: MessageBus, manager: MemoryManager) -> None:
    empty = await ctl("status")
    assert empty.rc == 0, empty.err
    assert "Stack: empty: the base only" in empty.out

    assert (await ctl("switch", "tools", "web")).rc == 0
    result = await ctl("status")
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].endswith("Stack: bottom to top")
    assert lines[1].split() == ["1.", "tools", "1.0", "/dev/loop11", "/opt/personality/tools"]
    assert lines[2].split() == ["2.", "web", "2.1", "/dev/loop10", "/opt/personality/web"]
    assert "Incompatible: old" in result.out
    assert "Writable: /dev/vdb" in result.out
    assert "Generation: 1" in result.out
    assert "Conflicts: none" in result.out

    data = json.loads((await ctl("status", "--json")).out)
    assert data["attached"] == ["tools", "web"]
    assert data["desired"] == ["tools", "web"]
    assert (data["generation"], data["conflict_count"]) == (1, 0)
    assert data["writable_device"] == "/dev/vdb"
    assert [p["name"] for p in data["personalities"]] == ["old", "tools", "web"]


async def test_conflicts(served: MessageBus, manager: MemoryManager) -> None:
    assert (await ctl("conflicts")).out == "No conflicts.\n"
    manager.set_conflicts([Conflict("/usr/bin/tool", "/usr", "web", ("tools",), False)])
    result = await ctl("conflicts")
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["PATH", "WINNER", "SHADOWED", "IDENTICAL"]
    assert lines[1].split() == ["/usr/bin/tool", "web", "tools", "no"]
    assert lines[-1] == "1 conflict listed."
    data = json.loads((await ctl("conflicts", "--json")).out)
    assert data == [
        {"path": "/usr/bin/tool", "winner": "web", "shadowed": ["tools"], "identical": False}
    ]
    assert "Conflicts: 1 (see 'personalityctl conflicts')" in (await ctl("status")).out


# -- changing verbs -----------------------------------------------------------------------------


async def test_attach_detach(served: MessageBus, manager: MemoryManager) -> None:
    result = await ctl("attach", "web")
    assert (result.rc, result.out) == (0, "Attached web.\n"), result.err
    result = await ctl("attach", "web")
    assert (result.rc, result.out) == (0, "web is already attached.\n")
    assert manager.attached == ("web",)
    result = await ctl("detach", "web")
    assert (result.rc, result.out) == (0, "Detached web.\n")
    result = await ctl("detach", "web")
    assert (result.rc, result.out) == (0, "web is not attached.\n")
    assert not manager.attached


async def test_attach_wait(served: MessageBus, manager: MemoryManager) -> None:
    attach = asyncio.create_task(ctl("attach", "late", "--wait", "600"))
    await manager.wait_for_callers(1)  # the Attach waits in the manager; only the volume ends it
    assert not attach.done()
    manager.add_volume(FakeVolume("late"))
    result = await asyncio.wait_for(attach, 120)
    assert (result.rc, result.out) == (0, "Attached late.\n"), result.err

    timed_out = await ctl("attach", "never", "--wait", "1")
    assert timed_out.rc == 1
    assert timed_out.err_line() == "personalityctl: volume of 'never' did not appear within 1s"


async def test_attach_force(served: MessageBus, manager: MemoryManager) -> None:
    refused = await ctl("attach", "old")
    assert refused.rc == 1
    assert refused.err_line().startswith("personalityctl: 'old' is incompatible with the base")
    assert (await ctl("attach", "old", "--force")).rc == 0
    assert manager.attached == ("old",)


async def test_switch(served: MessageBus, manager: MemoryManager) -> None:
    result = await ctl("switch", "tools", "web")
    assert (result.rc, result.out) == (0, "Switched to: tools web.\n"), result.err
    result = await ctl("switch", "tools", "web")
    assert (result.rc, result.out) == (0, "Already at: tools web.\n")
    result = await ctl("switch")
    assert (result.rc, result.out) == (0, "Switched to: the base only.\n")
    assert manager.desired == ()


async def test_changing_verbs_json(served: MessageBus, manager: MemoryManager) -> None:
    result = await ctl("switch", "tools", "web", "--json")
    assert result.rc == 0, result.err
    assert json.loads(result.out) == {
        "changed": True,
        "generation": 1,
        "attached": ["tools", "web"],
        "conflicts": 0,
    }
    assert json.loads((await ctl("--json", "attach", "web")).out)["changed"] is False
    manager.set_conflicts([Conflict("/usr/bin/tool", "/usr", "web", ("tools",), False)])
    detached = json.loads((await ctl("detach", "tools", "--json")).out)
    assert (detached["changed"], detached["attached"]) == (True, ["web"])
    assert json.loads((await ctl("refresh", "--json")).out)["changed"] is False

    failed = await ctl("attach", "nothere", "--json")
    assert failed.rc == 1
    assert json.loads(failed.out) == {
        "error": "org.personalityd.personality1.Error.NoSuchPersonality",
        "message": json.loads(failed.out)["message"],
    }
    assert failed.err_line() == "personalityctl: " + json.loads(failed.out)["message"]
    assert json.loads(failed.out)["message"].startswith("no personality named 'nothere'")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("attach", "nothere"), "personalityctl: no personality named 'nothere'"),
        (("detach", "nothere"), "personalityctl: no personality named 'nothere'"),
        (("attach", "../x"), "personalityctl: invalid personality name '../x'"),
        (("switch", "web", "a/b"), "personalityctl: invalid personality name 'a/b'"),
        (("switch", "web", "web"), "personalityctl: personality 'web' is listed more than once"),
        (
            ("attach", EXPLODING_NAME),
            "personalityctl: internal error; the daemon's log has the details",
        ),
    ],
)
async def test_failures_are_one_line_and_exit_1(
    served: MessageBus, argv: tuple[str, ...], message: str
) -> None:
    result = await ctl(*argv)
    assert result.rc == 1
    assert result.err_line().startswith(message)
    assert SECRET_TEXT not in result.err
    assert result.out == ""


async def test_usage_errors_exit_2(served: MessageBus) -> None:
    for argv in (
        ("attach",),
        ("attach", "web", "--wait", "x"),
        ("nonsense",),
        ("detach", "w", "--wait", "1"),
    ):
        result = await ctl(*argv)
        assert result.rc == 2, argv
        assert "usage:" in result.err


# -- reaching the daemon ------------------------------------------------------------------------


async def test_daemon_not_running(system_bus: str) -> None:
    result = await ctl("list")
    assert result.rc == 1
    line = result.err_line()
    assert line.startswith(UNREACHABLE)
    assert BUS in line


async def test_no_bus_at_all(tmp_path: Path) -> None:
    result = await ctl("--bus-address", f"unix:path={tmp_path}/nothing", "status")
    assert result.rc == 1
    assert result.err_line() == (
        f"{UNREACHABLE}unix:path={tmp_path}/nothing: [Errno 2] No such file or directory"
    )


async def test_bus_address_option_and_environment(system_bus: str, served: MessageBus) -> None:
    without_env = cli_env(drop=("DBUS_SYSTEM_BUS_ADDRESS",))
    explicit = await ctl("--bus-address", system_bus, "list", env=without_env)
    assert explicit.rc == 0, explicit.err
    from_env = await ctl("list", env=cli_env({"DBUS_SYSTEM_BUS_ADDRESS": system_bus}))
    assert from_env.out == explicit.out


# -- build --------------------------------------------------------------------------------------


MANIFEST = "usr/lib/extension-release.d/extension-release.web"


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    tool = src / "usr/bin/web-tool"
    tool.write_text("#!/bin/sh\necho web\n")
    tool.chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc/web.conf").write_text("port = 80\n")
    os.chown(src / "etc/web.conf", 65534, 65534)  # -all-root: root in the image
    return src


def tree_state(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.lstat().st_ino, p.lstat().st_mtime_ns) for p in root.rglob("*")
    )


def build_args(src: Path, image: Path, *extra: str) -> list[str]:
    return ["build", str(src), "--name", "web", "-o", str(image), *extra]


def test_build_squashfs(tmp_path: Path, source_tree: Path) -> None:
    before = tree_state(source_tree)
    image = tmp_path / "web.squashfs"
    result = ctl_sync(
        *build_args(source_tree, image, "--version", "2.1", "--id", "debian", "--version-id", "12"),
        "--description", "Web server stack", "--services", "nginx.service",
    )  # fmt: skip
    assert result.rc == 0, result.err
    assert result.out == f"Wrote {image} (squashfs): personality web.\n"
    fs_type = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert fs_type == "squashfs"
    manifest = subprocess.run(
        ["unsquashfs", "-cat", str(image), MANIFEST], capture_output=True, text=True, check=True
    ).stdout
    assert manifest == (
        "ID=debian\nVERSION_ID=12\nIMAGE_VERSION=2.1\n"
        'PERSONALITY_DESCRIPTION="Web server stack"\nPERSONALITY_SERVICES=nginx.service\n'
    )
    listing = subprocess.run(
        ["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/usr/bin/web-tool" in listing
    conf_line = next(line for line in listing.splitlines() if line.endswith("/etc/web.conf"))
    assert conf_line.split()[1] == "0/0"
    assert tree_state(source_tree) == before  # the source is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".personalityctl-build-")]


def test_build_erofs(tmp_path: Path, source_tree: Path) -> None:
    image = tmp_path / "web.erofs"
    image.write_text("an old image, replaced\n")
    result = ctl_sync(*build_args(source_tree, image, "--format", "erofs", "--version", "3"))
    assert result.rc == 0, result.err
    blkid = subprocess.run(
        ["blkid", "-o", "export", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "TYPE=erofs" in blkid
    out = tmp_path / "extracted"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], check=True, capture_output=True)
    fields = dict(line.split("=", 1) for line in (out / MANIFEST).read_text().splitlines())
    base_id, base_version = (read_base_os_release().get(k, "") for k in ("ID", "VERSION_ID"))
    assert fields["ID"] == (base_id or "_any")
    assert fields.get("VERSION_ID", "") == base_version
    assert fields["IMAGE_VERSION"] == "3"
    assert (out / "usr/bin/web-tool").read_text() == "#!/bin/sh\necho web\n"
    assert (out / "etc/web.conf").stat().st_uid == 0
    assert (out / "usr/lib/extension-release.d").stat().st_mode & 0o777 == 0o755


def test_build_refuses_a_whole_os_tree(tmp_path: Path, source_tree: Path) -> None:
    (source_tree / "usr/lib").mkdir()
    (source_tree / "usr/lib/os-release").write_text("ID=debian\n")
    image = tmp_path / "web.squashfs"
    result = ctl_sync(*build_args(source_tree, image))
    assert result.rc == 1
    assert result.err_line() == (
        f"personalityctl: {source_tree} has usr/lib/os-release: it looks like a whole OS tree, "
        "a personality holds only what it adds to the base"
    )
    assert not image.exists()


def test_build_refuses_a_tree_without_hierarchies(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    (src / "bin").mkdir(parents=True)
    (src / "bin/tool").write_text("x\n")
    result = ctl_sync(*build_args(src, tmp_path / "x.squashfs"))
    assert result.rc == 1
    assert "has none of the top-level directories usr/, etc/, opt/" in result.err_line()


def test_build_refuses_output_inside_the_source(source_tree: Path) -> None:
    result = ctl_sync(*build_args(source_tree, source_tree / "web.squashfs"))
    assert result.rc == 1
    assert "must not be inside" in result.err_line()


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")
def test_build_erofs_label_where_supported(tmp_path: Path) -> None:
    src = tmp_path / "s"
    (src / "usr/share/abc").mkdir(parents=True)
    image = tmp_path / "abc.erofs"
    result = ctl_sync("build", str(src), "--name", "abc", "-o", str(image), "--format", "erofs")
    assert result.rc == 0, result.err
    help_text = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True).stdout
    label = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(image)], capture_output=True, text=True
    ).stdout.strip()
    supported = any(line.lstrip().startswith("-L") for line in help_text.splitlines())
    assert label == ("personality-abc" if supported else "")
