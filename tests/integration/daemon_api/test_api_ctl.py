"""personalityctl against the real daemon, as an operator runs it: reading and changing verbs,
exit codes and messages, images it builds that the daemon then stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bus_clients import NOBODY, Result
from served_daemon import ADDRESS_ENV, Images, Serve, Trio, no_traceback, read

from testkit.contract import BUS
from testkit.daemon import Daemon
from testkit.loops import LoopDevices
from testkit.paths import REPO
from testkit.polling import wait_for

# -- personalityctl -------------------------------------------------------------------------------

CTL_PREFIX = "personalityctl: "


def ctl_env(extra: Mapping[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "daemon"), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def ctl(
    *argv: str,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    timeout: float = 120,
) -> Result:
    """`personalityctl ARGV...` as a user runs it (the bus from $DBUS_SYSTEM_BUS_ADDRESS)."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "personalityd.client.cli", *argv],
        capture_output=True, text=True, env=dict(env) if env is not None else ctl_env(),
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ctl_ok(*argv: str, **kw: Any) -> str:
    result = ctl(*argv, **kw)
    assert (result.rc, result.err) == (0, ""), (argv, result)
    return result.out


def ctl_fails(*argv: str, **kw: Any) -> str:
    """Exit 1 with exactly one line on stderr (returned without the prefix), nothing on stdout."""
    result = ctl(*argv, **kw)
    assert result.rc == 1, (argv, result)
    assert result.out == "", (argv, result)
    line = result.err_line()
    assert line.startswith(CTL_PREFIX), line
    return line.removeprefix(CTL_PREFIX)


def test_personalityctl_reading_verbs_in_both_output_modes(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("webplus", {"usr/bin/web-tool": "#!/bin/sh\necho plus\n"}))
    serve(daemon)
    assert ctl_ok("switch", "web", "webplus") == "Switched to: web webplus.\n"
    mount = str(daemon.mount_root)

    lines = ctl_ok("list").splitlines()
    assert lines[0].split() == ["NAME", "STATE", "VERSION", "DEVICE", "MOUNT", "POINT"]
    assert [line.split() for line in lines[1:5]] == [
        ["old", "incompatible", "0.9", trio.old, "-"],
        ["tools", "available", "1.0", trio.tools, "-"],
        ["web", "attached", "2.1", trio.web, f"{mount}/web"],
        ["webplus", "attached", "-", lines[4].split()[3], f"{mount}/webplus"],
    ]
    assert lines[5:] == ["", "4 personalities listed."]
    # Columns are aligned: every row's STATE starts where the header's does.
    column = lines[0].index("STATE")
    assert all(line[column - 1] == " " and line[column] != " " for line in lines[1:5])

    for argv in (("list", "--json"), ("--json", "list")):
        data = json.loads(ctl_ok(*argv))
        assert data[0] == {
            "name": "old",
            "state": "incompatible",
            "version": "0.9",
            "device": trio.old,
            "mount_point": "",
        }
        assert data[2] == {
            "name": "web",
            "state": "attached",
            "version": "2.1",
            "device": trio.web,
            "mount_point": f"{mount}/web",
        }

    status = ctl_ok("status")
    lines = status.splitlines()
    assert lines[0].endswith("Stack: bottom to top"), status
    assert lines[1].split() == ["1.", "web", "2.1", trio.web, f"{mount}/web"]
    assert lines[2].split()[:2] == ["2.", "webplus"]
    for expected in (
        "Incompatible: old",
        "Available: tools",
        "Writable: none (read-only stack)",
        "Generation: 1",
        "Conflicts: 1 (see 'personalityctl conflicts')",
    ):
        assert expected in status, (expected, status)
    data = json.loads(ctl_ok("status", "--json"))
    assert data["attached"] == ["web", "webplus"]
    assert data["desired"] == ["web", "webplus"]
    assert (data["generation"], data["conflict_count"], data["writable_device"]) == (1, 1, "")
    assert [p["name"] for p in data["personalities"]] == ["old", "tools", "web", "webplus"]
    assert json.loads(ctl_ok("--json", "status")) == data

    lines = ctl_ok("conflicts").splitlines()
    assert lines[0].split() == ["PATH", "WINNER", "SHADOWED", "IDENTICAL"]
    assert lines[1].split() == ["/usr/bin/web-tool", "webplus", "web", "no"]
    assert lines[2:] == ["", "1 conflict listed."]
    assert json.loads(ctl_ok("conflicts", "--json")) == [
        {"path": "/usr/bin/web-tool", "winner": "webplus", "shadowed": ["web"], "identical": False}
    ]

    # Pending: desired, its volume gone.
    webplus_dev = json.loads(ctl_ok("list", "--json"))[3]["device"]
    loop_devices.yank(webplus_dev)
    wait_for(
        lambda: read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n",
        what="webplus to leave the stack",
    )
    status = ctl_ok("status")
    assert "Pending: webplus" in status, status
    assert "Conflicts: none" in status
    assert ctl_ok("conflicts") == "No conflicts.\n"
    assert json.loads(ctl_ok("conflicts", "--json")) == []
    assert json.loads(ctl_ok("list", "--json"))[3]["state"] == "pending"

    # The bus from --bus-address, or from the environment; nobody may read too.
    without_env = ctl_env(drop=(ADDRESS_ENV,))
    explicit = ctl_ok("--bus-address", system_bus, "list", env=without_env)
    assert explicit == ctl_ok("list", env=ctl_env({ADDRESS_ENV: system_bus}))
    assert ctl_ok("list", prefix=NOBODY) == explicit
    assert json.loads(ctl_ok("status", "--json", prefix=NOBODY)) == json.loads(
        ctl_ok("status", "--json")
    )
    no_traceback(daemon)


def test_personalityctl_changing_verbs_and_exit_codes(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    trio: Trio,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    late = image("late", {"usr/bin/late": b"arrived\n"})
    serve(daemon)
    assert ctl_ok("attach", "web") == "Attached web.\n"
    assert read(sandbox_root, "usr/bin/web-tool") == b"#!/bin/sh\necho web\n"
    assert ctl_ok("attach", "web") == "web is already attached.\n"

    assert ctl_fails("attach", "old").startswith("'old' is incompatible with the base: ID 'fedora'")
    assert ctl_ok("attach", "old", "--force") == "Attached old.\n"
    assert read(sandbox_root, "etc/old.conf") == b"old = 1\n"
    assert ctl_ok("detach", "old") == "Detached old.\n"
    assert ctl_ok("detach", "old") == "old is not attached.\n"
    assert not (sandbox_root / "etc/old.conf").exists()

    assert ctl_ok("switch", "tools", "web") == "Switched to: tools web.\n"
    assert ctl_ok("switch", "tools", "web") == "Already at: tools web.\n"
    assert read(sandbox_root, "etc/tools.conf") == b"tools = 1\n"
    assert ctl_ok("switch", "web", "--force") == "Switched to: web.\n"
    assert not (sandbox_root / "etc/tools.conf").exists()

    # --wait: the volume comes while personalityctl waits.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "personalityd.client.cli", "attach", "late", "--wait", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ctl_env(),
    )  # fmt: skip
    try:
        time.sleep(1)
        assert waiting.poll() is None
        loop_devices.attach(late)
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert (waiting.returncode, out, err) == (0, "Attached late.\n", "")
    assert read(sandbox_root, "usr/bin/late") == b"arrived\n"

    # Failures: exit 1, one line on stderr.
    started = time.monotonic()
    assert (
        ctl_fails("attach", "never", "--wait", "1") == "no volume for 'never' appeared within 1 s"
    )
    assert time.monotonic() - started >= 1
    for argv, message in (
        (("attach", "webb"), "no personality named 'webb'; available: late, old, tools, web"),
        (("detach", "webb"), "no personality named 'webb'; available: late, old, tools, web"),
        (
            ("switch", "web", "webb"),
            "no personality named 'webb'; available: late, old, tools, web",
        ),
        (("attach", "../x"), "invalid personality name '../x'"),
        (("attach", ""), "invalid personality name ''"),
        (("attach", "a" * 200), "invalid personality name 'aaaa"),
        (("switch", "web", "web"), "personality 'web' is listed more than once"),
    ):
        assert ctl_fails(*argv).startswith(message), argv
    assert "Attach is only allowed for root and members of the group 'personality'" in ctl_fails(
        "attach", "tools", prefix=NOBODY
    )
    assert "Switch is only allowed" in ctl_fails("switch", prefix=NOBODY)
    assert "Detach is only allowed" in ctl_fails("detach", "web", prefix=NOBODY)

    # Usage errors: exit 2.
    usage: tuple[tuple[str, ...], ...] = (
        ("attach",),
        ("attach", "web", "--wait", "soon"),
        ("detach",),
        ("nonsense",),
        ("--json", "detach", "web", "--wait", "1"),
        ("build", "somewhere"),
        (),
    )
    for usage_argv in usage:
        result = ctl(*usage_argv)
        assert result.rc == 2, (usage_argv, result)
        assert "usage:" in result.err, usage_argv
    for verb in ("list", "status", "attach", "detach", "switch", "conflicts", "build"):
        result = ctl(verb, "--help")
        assert result.rc == 0 and "usage:" in result.out, verb

    # None of the failures changed the stack.
    data = json.loads(ctl_ok("status", "--json"))
    assert data["attached"] == ["web", "late"]
    assert ctl_ok("switch") == "Switched to: the base only.\n"
    assert json.loads(ctl_ok("status", "--json"))["attached"] == []
    assert not (sandbox_root / "usr/bin/web-tool").exists()

    # With the daemon gone: exit 1, one line naming the bus name.
    no_traceback(daemon)
    daemon.stop()
    assert "cannot reach personalityd on the system bus: " in ctl_fails("list")
    assert BUS in ctl_fails("status")


def test_personalityctl_build_makes_images_the_daemon_stacks(
    serve: Serve,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
) -> None:
    src = tmp_path / "hello-src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
    (src / "usr/bin/hello").chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc/hello.conf").write_text("greeting = hello\n")
    other = tmp_path / "bye-src"
    (other / "opt/bye").mkdir(parents=True)
    (other / "usr/share/bye").mkdir(parents=True)
    (other / "usr/share/bye/README").write_text("bye\n")
    images = tmp_path / "images"
    images.mkdir()
    hello_img = images / "hello.squashfs"
    bye_img = images / "bye.erofs"

    out = ctl_ok(
        "build", str(src), "--name", "hello", "-o", str(hello_img),
        "--id", "debian", "--version-id", "12", "--version", "1.5",
    )  # fmt: skip
    assert out == f"Wrote {hello_img} (squashfs): personality hello.\n"
    out = ctl_ok(
        "build", str(other), "--name", "bye", "-o", str(bye_img), "--format", "erofs",
        "--id", "_any", "--version", "0.1",
    )  # fmt: skip
    assert out == f"Wrote {bye_img} (erofs): personality bye.\n"
    # Refusals: exit 1, one line; usage errors: exit 2.
    (src / "usr/lib").mkdir()
    (src / "usr/lib/os-release").write_text("ID=debian\n")
    assert "looks like a whole OS tree" in ctl_fails(
        "build", str(src), "--name", "x", "-o", str(images / "x.squashfs")
    )
    assert not (images / "x.squashfs").exists()
    assert ctl("build", str(other), "-o", str(images / "y.squashfs")).rc == 2
    assert ctl("build", str(other), "--name", "y", "-o", "y", "--format", "zip").rc == 2

    hello_dev = loop_devices.attach(hello_img)
    serve(daemon)
    bye_dev = loop_devices.attach(bye_img)  # while the daemon runs: found through udev
    wait_for(
        lambda: "bye" in ctl_ok("list"),
        what="the daemon to see the erofs volume",
    )
    data = {p["name"]: p for p in json.loads(ctl_ok("list", "--json"))}
    assert data["hello"] == {
        "name": "hello",
        "state": "available",
        "version": "1.5",
        "device": hello_dev,
        "mount_point": "",
    }
    assert (data["bye"]["state"], data["bye"]["version"], data["bye"]["device"]) == (
        "available", "0.1", bye_dev
    )  # fmt: skip

    assert ctl_ok("attach", "hello") == "Attached hello.\n"
    assert ctl_ok("attach", "bye") == "Attached bye.\n"
    hello = sandbox_root / "usr/bin/hello"
    assert hello.read_text() == "#!/bin/sh\necho hello\n"
    assert os.access(hello, os.X_OK)
    assert hello.stat().st_uid == 0
    assert read(sandbox_root, "etc/hello.conf") == b"greeting = hello\n"
    assert read(sandbox_root, "usr/share/bye/README") == b"bye\n"
    manifest = sandbox_root / "usr/lib/extension-release.d/extension-release.hello"
    assert manifest.read_text().splitlines()[:3] == [
        "ID=debian",
        "VERSION_ID=12",
        "IMAGE_VERSION=1.5",
    ]
    status = ctl_ok("status")
    assert "1. hello" in " ".join(status.split())
    assert "2. bye" in " ".join(status.split())
    no_traceback(daemon)
