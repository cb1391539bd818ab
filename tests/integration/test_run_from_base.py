"""The daemon runs from the base: restarted on a live stack over the hierarchy that holds its
own interpreter, it re-executes itself through the read-only base reference, and nothing it
maps is on a stack (docs/security.md).

The sandbox's third hierarchy, `/srv/python`, is a read-only bind of the Python installation
that runs the tests, so the daemon's interpreter, standard library and extension modules are
below a stack once a personality provides `srv/python`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from sandbox_view import Images, ok, read

from testkit.daemon import Daemon
from testkit.loops import LoopDevices
from testkit.mounts import mountinfo
from testkit.paths import REPO

HIERARCHY = "srv/python"


def overlay_device(mount_point: Path) -> tuple[int, int]:
    tops = [(fstype, source) for at, fstype, source in mountinfo() if at == str(mount_point)]
    assert tops and tops[-1] == ("overlay", "personalityd"), tops
    st_dev = os.stat(mount_point).st_dev
    return os.major(st_dev), os.minor(st_dev)


def mapped_on(pid: int, device: tuple[int, int]) -> list[str]:
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if (major, minor) == device:
                found.append(fields[5])
    return found


def test_a_restart_on_a_stacked_interpreter_runs_from_the_base(
    daemon_factory: Callable[..., Daemon],
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    prefix = sandbox_root / HIERARCHY
    prefix.mkdir(parents=True)
    subprocess.run(["mount", "--bind", "-o", "ro", sys.base_prefix, str(prefix)], check=True)
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    loop_devices.attach(image("py-extra", {f"{HIERARCHY}/share/py-extra.txt": b"extra\n"}))
    paths = sysconfig.get_paths()
    dependencies = os.pathsep.join(
        dict.fromkeys((str(REPO / "daemon"), paths["purelib"], paths["platlib"]))
    )
    daemon = daemon_factory(
        config={"stack": {"hierarchies": ["/usr", "/etc", f"/{HIERARCHY}"]}},
        env={"PYTHONPATH": dependencies},
    )
    daemon.interpreter = str(prefix / "bin" / python)
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "py-extra"}))
    assert read(sandbox_root, f"{HIERARCHY}/share/py-extra.txt") == b"extra\n"
    device = overlay_device(prefix)

    daemon.stop()
    daemon.start()  # through the stack: bin/python3.x is now below the overlay
    log = daemon.log_text()
    assert "event=reexec_from_base" in log, log[-3000:]
    assert "running_from_stack" not in log
    assert daemon.pid is not None
    assert mapped_on(daemon.pid, device) == []
    assert (Path(f"/proc/{daemon.pid}/exe").resolve()).exists()
    # and it serves: the stack it adopted is intact and it takes changes
    ok(daemon.request({"action": "detach", "personality": "py-extra"}))
    assert not (prefix / "share/py-extra.txt").exists()
