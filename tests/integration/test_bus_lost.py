"""The system bus going away under a running daemon (dbus-daemon restarted or stopped): the
daemon logs it, keeps serving its other front ends, and waits for the bus to come back,
instead of dying on the error dbus-fast hands on (EOFError from its reader)."""

from __future__ import annotations

from pathlib import Path

from sandbox_view import Images, ok, read
from served_daemon import SERVING_EVENT, serve_on

from testkit.daemon import Daemon
from testkit.dbus import private_system_bus
from testkit.loops import LoopDevices
from testkit.polling import wait_for


def test_the_daemon_outlives_its_bus(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("web", {"usr/bin/web": "web\n"}))
    with private_system_bus(set_env=False) as address:
        serve_on(daemon, address)
        assert SERVING_EVENT in daemon.log_text()
    wait_for(lambda: "event=dbus_disconnected" in daemon.log_text() or not daemon.running(),
             timeout=60, what="the daemon to notice that the bus is gone")  # fmt: skip
    assert daemon.running(), daemon.log_text()[-4000:]
    ok(daemon.request({"action": "attach", "personality": "web"}))
    assert read(sandbox_root, "usr/bin/web") == b"web\n"
    assert daemon.running()
    assert "Traceback" not in daemon.log_text()
