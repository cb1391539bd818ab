"""The environment of one benchmark run: udev tagging, loop devices, a private D-Bus, daemons.

Everything is torn down through the run's `ExitStack`: the daemon stopped by PID, the mounts
under bench/data/run unmounted, the loop devices detached while still ours, the udev rule
removed, a udevd we started stopped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Sequence

from dataset import IMAGES, Recipe
from settings import RUN_DIR
from testkit.daemon import Daemon
from testkit.dbus import private_system_bus
from testkit.loops import LoopDevices
from testkit.mounts import remove_tree, unmount_tree
from testkit.polling import wait_for
from testkit.processes import stop_pid
from testkit.sandbox import make_sandbox_root
from testkit.udev import ensure_udevd, udev_settle, udev_tag_rule

NO_BUS = "unix:path=/nonexistent/personalityd-bench-no-bus"


class Env:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        remove_tree(RUN_DIR)
        RUN_DIR.mkdir(parents=True)
        self.udevd = ensure_udevd()
        if self.udevd is not None:
            stack.callback(stop_pid, self.udevd, "systemd-udevd")
        self.token = f"bench{os.getpid()}-{uuid.uuid4().hex[:6]}"
        stack.enter_context(udev_tag_rule(self.token, IMAGES.resolve()))
        self.loops = LoopDevices()
        stack.callback(self.loops.cleanup)
        stack.callback(unmount_tree, RUN_DIR)
        self.bus_address = stack.enter_context(private_system_bus(set_env=False))
        self.devices: dict[str, str] = {}  # image name -> loop device
        self.daemon: Daemon | None = None
        self.root = RUN_DIR / "root"
        stack.callback(self.stop_daemon)

    # loop devices

    def attach(self, recipes: Sequence[Recipe], settle: bool = True) -> None:
        """Attach the images not attached yet (read-only); then one `udevadm settle`."""
        for recipe in recipes:
            if recipe.name not in self.devices:
                self.devices[recipe.name] = self.loops.attach(recipe.image, settle=False)
        if settle:
            udev_settle(120)

    def detach(self, recipes: Sequence[Recipe]) -> None:
        for recipe in recipes:
            dev = self.devices.pop(recipe.name, None)
            if dev is not None:
                self.loops.detach(dev, settle=False)
        udev_settle(120)

    # the daemon

    def fresh_root(self) -> None:
        """Stop the daemon, unmount what it left, and start from an empty desired list."""
        self.stop_daemon()
        remove_tree(self.root)
        make_sandbox_root(self.root)
        # /run is a tmpfs on every systemd host: the runtime files (stack record, conflict
        # report) are written there, so the sandbox gets one too.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "run", self.root / "run"], check=True
        )

    def start_daemon(
        self, *, dbus: bool = False, fresh: bool = True, extra_env: dict[str, str] | None = None
    ) -> Daemon:
        """A daemon on the sandbox root, ready; on the private bus with `dbus`, else on none.
        `extra_env` is added to its environment (a PYTHONPATH there runs another tree)."""
        if fresh:
            self.fresh_root()
        else:
            self.stop_daemon()
        env = {
            "PERSONALITYD_LOG_LEVEL": "info",
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address if dbus else NO_BUS,
            **(extra_env or {}),
        }
        daemon = Daemon(self.root, RUN_DIR, udev_token=self.token, env=env, name="personalityd")
        daemon.start(timeout=600)
        self.daemon = daemon
        if dbus:
            wait_for(
                lambda: "dbus_serving" in daemon.log_text(),
                30,
                "the daemon on D-Bus",
                interval=0.005,
            )
        return daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=30)
            self.daemon = None

    def rebuilds(self) -> int:
        """The stack rebuilds the daemon has logged (`stack_changed` events)."""
        assert self.daemon is not None
        return self.daemon.log_text().count("event=stack_changed")
