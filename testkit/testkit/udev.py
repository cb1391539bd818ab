"""udev for tests: udevd running, settling, device properties, events, the tagging rule.

Facts established on Debian 12 (udev 252), relied on by the tests:

- `losetup --find --show IMG` emits one kernel `change` uevent for `/dev/loopN`; after udev's
  rules the `UDEV change` event carries `ID_FS_TYPE` (`squashfs`, `erofs`, `ext4`) and, for
  ext4, `ID_FS_LABEL`. There is no `add` event: loop nodes exist before they are set up.
- `losetup -d` on an idle device emits two `change` events whose properties no longer have
  any `ID_FS_*` (udev sets `SYSTEMD_READY=0`); never a `remove`.
- `losetup -d` on a busy (mounted) device emits nothing at all: the kernel only sets
  autoclear, the device keeps working, and the two `change` events come when the last user
  (mount) lets go.
- `udevadm trigger --action=remove /sys/block/loopN` delivers a synthetic `remove` event
  (kernel and udev), whether or not the device is still set up. It carries the properties udev
  has stored: for a busy device still `ID_FS_TYPE` etc.; for an idle device that `losetup -d`
  already cleared, none of them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from testkit.processes import host_namespace_prefix, pid_alive, pids_named, ppid, run, stop_process

UDEVD = "/lib/systemd/systemd-udevd"

# The udev property the tagging rule sets on loop devices backed by a run's own files.
TEST_PROPERTY = "PERSONALITYD_TEST"

RULES_DIR = Path("/run/udev/rules.d")


def ensure_udevd(timeout: float = 10) -> int | None:
    """Start systemd-udevd unless a process named `systemd-udevd` exists.

    Returns the PID of the udevd we started (found by comparing the `systemd-udevd` processes
    before and after `--daemon` forks), or None when one was already running.
    """
    before = pids_named("systemd-udevd")
    if before:
        return None
    run(*host_namespace_prefix(), UDEVD, "--daemon")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = pids_named("systemd-udevd") - before
        # The main process is the one whose parent is not itself a new udevd (not a worker).
        mains = [pid for pid in new if ppid(pid) not in new]
        if mains and os.path.exists("/run/udev/control"):
            udev_settle()
            return min(mains)
        time.sleep(0.05)
    raise AssertionError(f"{UDEVD} --daemon started, but no systemd-udevd process appeared")


def udev_settle(timeout: float = 30) -> None:
    """Wait until udevd has processed every uevent the kernel has sent so far."""
    run("udevadm", "settle", f"--timeout={int(timeout)}", timeout=timeout + 5)


def udev_properties(dev: str) -> dict[str, str]:
    """The udev properties of a device node (`udevadm info --query=property`)."""
    out = run("udevadm", "info", "--query=property", f"--name={dev}")
    props = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def wait_udev_property(
    dev: str, key: str, value: str | None = None, timeout: float = 10
) -> dict[str, str]:
    """Poll until `dev` has udev property `key` (equal to `value` if given); return all props."""
    deadline = time.monotonic() + timeout
    while True:
        props = udev_properties(dev)
        if key in props and (value is None or props[key] == value):
            return props
        if time.monotonic() > deadline:
            raise AssertionError(f"{dev}: udev property {key}={value or '*'} missing: {props}")
        time.sleep(0.1)


@dataclass(frozen=True)
class UdevEvent:
    """One `UDEV` event as printed by `udevadm monitor --udev --property`.

    `stamp` is udevadm's reception time, CLOCK_MONOTONIC seconds (as `time.monotonic()`).
    """

    action: str
    devpath: str
    properties: dict[str, str]
    stamp: float = 0.0

    @property
    def devname(self) -> str | None:
        return self.properties.get("DEVNAME")


def parse_monitor_output(text: str) -> list[UdevEvent]:
    """The complete `UDEV` events in `udevadm monitor --udev --property` output."""
    events = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or not lines[0].startswith("UDEV "):
            continue
        head = lines[0].split()
        if len(head) < 4:
            continue  # the header line, or a line still being written
        try:
            stamp = float(head[1].strip("[]"))
        except ValueError:
            continue
        props = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
        events.append(UdevEvent(action=head[2], devpath=head[3], properties=props, stamp=stamp))
    return events


class UdevMonitor:
    """`udevadm monitor --udev --property --subsystem-match=block` in the background.

    Use as a context manager; `events()` parses what arrived so far, `wait_for(action, dev)`
    polls for one event. The monitor process is ours and is stopped by PID on exit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: TextIO | None = None

    def __enter__(self) -> UdevMonitor:
        self._out = open(self.path, "w")  # closed in __exit__
        self._proc = subprocess.Popen(
            ["udevadm", "monitor", "--udev", "--property", "--subsystem-match=block"],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        # udevadm prints its header after it has bound its netlink socket.
        deadline = time.monotonic() + 10
        while "UDEV - the event" not in self.path.read_text():
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.__exit__()
                raise AssertionError(f"udevadm monitor did not start: {self.path.read_text()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=5)
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def events(self) -> list[UdevEvent]:
        return parse_monitor_output(self.path.read_text())

    def wait_for(
        self,
        action: str,
        dev: str,
        predicate: Callable[[UdevEvent], bool] | None = None,
        timeout: float = 10,
    ) -> UdevEvent:
        """Wait for a `UDEV` event with `action` for device node `dev` (and `predicate`)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if (
                    event.action == action
                    and event.devname == dev
                    and (predicate is None or predicate(event))
                ):
                    return event
            if time.monotonic() > deadline:
                seen = [(e.action, e.devname) for e in self.events()]
                raise AssertionError(f"no udev {action} event for {dev}; seen: {seen}")
            time.sleep(0.05)


def _remove_stale_rules() -> None:
    """Tagging rules of test sessions that were killed (-9) before they could remove them."""
    for stale in RULES_DIR.glob("61-personalityd-test-s*-*.rules"):
        pid = stale.name.removeprefix("61-personalityd-test-s").split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def udev_tag_rule(token: str, backing_dir: Path) -> Iterator[Path]:
    """Install a runtime udev rule that tags loop devices backed by files under `backing_dir`.

    The rule sets `PERSONALITYD_TEST=<token>` on them. Daemons started by `Daemon` match only
    tagged devices, so they never pick up volumes of other test runs on the same machine
    (udev and loop devices are global). The rule file is removed (and udev reloaded) on exit.

    The kernel shows `loop/backing_file` as seen from the root of whoever reads it, here
    udevd; the pattern starts with `*` so that it also matches when the tests run in a chroot
    or container whose root is a subdirectory of udevd's.
    """
    RULES_DIR.mkdir(parents=True, exist_ok=True)
    _remove_stale_rules()
    rule = RULES_DIR / f"61-personalityd-test-{token}.rules"
    pattern = "*" + str(backing_dir).rstrip("/") + "/*"
    rule.write_text(
        "# personalityd integration tests: tag this run's loop devices (removed after the run)\n"
        f'SUBSYSTEM=="block", KERNEL=="loop[0-9]*", ATTR{{loop/backing_file}}=="{pattern}", '
        f'ENV{{{TEST_PROPERTY}}}="{token}"\n'
    )
    run("udevadm", "control", "--reload")
    try:
        yield rule
    finally:
        rule.unlink(missing_ok=True)
        # A udevd that has gone meanwhile (stopped by the session that started it) needs no
        # reload: the next one reads the rules afresh.
        if pids_named("systemd-udevd"):
            run("udevadm", "control", "--reload")
