"""The daemon reads its configuration and the base's os-release from the base, never through a
stack, also when it restarts with a stack in place (docs/configuration.md).

The attack of issue 9 item 2, on a sandbox root: a personality ships a drop-in that moves the
spool to a world-writable directory, opens it to `nogroup` and drops `nosuid`, a vendor file
of its own, and an opaque `usr/lib` that hides the base's vendor file and os-release. The
administrator turned the protected paths off, so only reading from the base stands in the way.
After a restart with the stack in place, the configuration in effect is the base's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sandbox_view import Images, ok, read

from testkit.daemon import Daemon
from testkit.images import OPAQUE
from testkit.loops import LoopDevices
from testkit.mounts import is_mount_point
from testkit.spool import new_name, wait_result

DEBIAN = {"ID": "debian", "VERSION_ID": "12"}
BASE_VENDOR = '[volumes]\nmount_options = ["ro", "nodev", "nosuid", "noatime"]\n'
EVIL_DROP_IN = (
    '[spool]\ndir = "/tmp"\nallowed_groups = ["personality", "nogroup"]\n'
    '[volumes]\nmount_options = ["ro"]\n'
)
EVIL_VENDOR = '[writable]\nfallback = "tmpfs"\n'


def mount_options(path: Path) -> set[str]:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "OPTIONS", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return set(out.strip().split(","))


def request_owned_by_nobody(daemon: Daemon, body: dict[str, object]) -> dict[str, object]:
    """A request file owned by uid 65534 (nobody, group nogroup), renamed into the spool."""
    name = new_name("nobody")
    tmp = daemon.spool_dir / f".{name}"
    tmp.write_text(json.dumps(body))
    os.chown(tmp, 65534, 65534)
    tmp.rename(daemon.spool_dir / f"{name}.json")
    return wait_result(daemon.spool_dir, name, timeout=120)


@pytest.mark.parametrize("restart", ["sigterm", "kill9"])
def test_a_restart_under_a_hostile_stack_reads_the_base(
    restart: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    root = sandbox_root
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")  # as Debian has it
    (root / "usr/lib/personalityd").mkdir()
    (root / "usr/lib/personalityd/personalityd.toml").write_text(BASE_VENDOR)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    loop_devices.attach(
        image(
            "evil",
            {
                "etc/personalityd/personalityd.toml.d/50-x.toml": EVIL_DROP_IN,
                "usr/lib": OPAQUE,
                "usr/lib/personalityd/personalityd.toml": EVIL_VENDOR,
            },
            manifest=DEBIAN,
        )
    )
    loop_devices.attach(image("later", {"usr/bin/later": "later\n"}, manifest=DEBIAN))
    loop_devices.attach(
        image("suid", {"usr/bin/su-ish": ("file", "#!/bin/sh\nid -u\n", 0o4755)})
    )
    daemon.update_config({"volumes": {"protected_paths": []}})
    daemon.start()
    first = ok(daemon.request({"action": "attach", "personality": "evil"}))

    # Through the stack, the hostile files are what a naive reader would find.
    assert read(root, "etc/personalityd/personalityd.toml.d/50-x.toml") == EVIL_DROP_IN.encode()
    assert read(root, "usr/lib/personalityd/personalityd.toml") == EVIL_VENDOR.encode()
    assert not (root / "etc/os-release").exists()  # the opaque usr/lib hides its target

    if restart == "sigterm":
        daemon.restart(timeout=300)
    else:
        daemon.kill9()
        daemon.start(timeout=300)

    # The spool is the base's: the hostile one was never set up, and requests are answered.
    assert not (root / "tmp/done").exists()
    assert not (root / "tmp/failed").exists()
    both = ok(daemon.request({"action": "attach", "personality": "later"}, timeout=120))
    # os-release came from the base (Debian 12): evil stayed stacked and later is compatible.
    assert both["attached"] == ["evil", "later"]
    assert both["generation"] == first["generation"] + 1
    assert read(root, "usr/bin/later") == b"later\n"
    # The mount options are the base vendor file's, not the drop-in's.
    assert {"ro", "nodev", "nosuid", "noatime"} <= mount_options(daemon.mount_root / "later")
    # writable.fallback stayed "none": no volatile upper was made.
    assert not is_mount_point(daemon.runtime_dir / "volatile")
    # spool.allowed_groups stayed the base's: a request of nobody's is refused.
    refused = request_owned_by_nobody(daemon, {"action": "detach", "personality": "evil"})
    assert (refused["_dir"], refused["code"]) == ("failed", "access-denied"), refused
    # nosuid is still in force: the set-uid volume is not stacked.
    suid = daemon.request({"action": "attach", "personality": "suid", "force": True})
    assert suid["status"] == "error", suid
    assert not (root / "usr/bin/su-ish").exists()
    assert "config_warning" not in daemon.log_text()
