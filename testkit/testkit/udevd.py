"""A systemd-udevd of the test session's own, whether or not the machine runs one.

tests/conftest.py runs the session in a network namespace of its own as well as a mount
namespace of its own (`unshare -m -n`). That is what makes a private udevd possible:

- udev's event multicast (netlink, group "udev") stays inside a network namespace, while the
  kernel sends each uevent to every network namespace of the initial user namespace. A udevd
  started in ours processes the session's loop devices as the machine's udevd would, and
  everything in the session that listens for udev events (the daemons under test, `udevadm
  monitor`) hears ours alone.
- udev's database and control socket are found by path (/run/udev), so a tmpfs covers
  /run/udev in the session's mount namespace before ours starts. The machine's udevd (if any)
  keeps its own, never sees the session's runtime rule, and `udevadm` in the session (settle,
  info, control, trigger --settle) talks to ours. In its own namespace the machine's udevd
  processes the same kernel events for its own listeners, as it does for any loop device.

So stopping or restarting ours (tests/stress) harms no one, and no test depends on who else
runs a udevd. Ours runs in the foreground as a child of pytest under `setpriv --pdeathsig
TERM`, so it ends with the session even when pytest is killed, and is stopped by its PID. It is
started through a symlink named `pdtest-udevd` (udevadm is multi-call: a name containing
"udevd" runs the daemon), so that nothing looking for the machine's udevd by process name
(`systemd-udevd`) mistakes ours for it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

UDEVD = "/lib/systemd/systemd-udevd"
UDEV_RUN = "/run/udev"
PROCESS_NAME = "pdtest-udevd"


# Set by tests/conftest.py before its re-exec: the network namespace pytest was started in.
OUTER_NETNS_ENV = "PERSONALITYD_TEST_OUTER_NETNS"


def private_network_namespace() -> bool:
    """True when this process is in another network namespace than PID 1 (or, where PID 1's
    is out of reach, as in some sandboxes, than the one pytest was started in)."""
    ours = os.readlink("/proc/self/ns/net")
    try:
        return ours != os.readlink("/proc/1/ns/net")
    except OSError:
        outer = os.environ.get(OUTER_NETNS_ENV)
        return outer is not None and ours != outer


def _mount_of(path: str) -> tuple[str, list[str]]:
    """(mount point, optional fields) of the mount that holds `path`, from mountinfo."""
    best: tuple[str, list[str]] = ("", [])
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            optional = fields[6 : fields.index("-")]
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, optional)
    return best


class PrivateUdevd:
    """systemd-udevd in the foreground, ours alone (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "udevd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError("our udevd is not running")
        return self.proc.pid

    def start(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError(f"our udevd is already running (PID {self.proc.pid})")
        link = self.workdir / PROCESS_NAME
        if not link.is_symlink():
            link.symlink_to(UDEVD)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--", str(link)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"our udevd exited (status {self.proc.returncode}): "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"our udevd did not answer a ping within {timeout} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        ping = subprocess.run(
            ["udevadm", "control", "--ping", "--timeout=5"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        return ping.returncode == 0

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM by PID, SIGKILL after `timeout`; reaped either way."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_udevd(workdir: Path) -> Iterator[PrivateUdevd]:
    """A tmpfs over /run/udev, our udevd on it; both gone afterwards (also on failure)."""
    if not private_network_namespace():
        raise RuntimeError(
            "the integration tests run their own udevd in a network namespace of their own: "
            "run pytest on `tests` as root (tests/conftest.py re-executes it under `unshare -m "
            "-n`); system tests (PERSONALITYD_SYSTEM_TEST=1) keep the host's network and "
            "cannot run in the same session"
        )
    os.makedirs(UDEV_RUN, exist_ok=True)
    point, optional = _mount_of(UDEV_RUN)
    if any(f.startswith("shared:") for f in optional):
        raise RuntimeError(
            f"{point} propagates mounts to other namespaces: not covering {UDEV_RUN}"
        )
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "pdtest-udev", UDEV_RUN],
        check=True,
    )
    udevd = PrivateUdevd(workdir)
    try:
        udevd.start()
        yield udevd
    finally:
        udevd.stop()
        subprocess.run(["umount", "--lazy", UDEV_RUN], check=False)
