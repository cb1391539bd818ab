"""Helpers for the integration tests: the real udevd and journald, loop devices, images, the daemon.

Everything here works on the real machine (global udev, global loop devices, the system journal)
from inside the private mount namespace that `tests/conftest.py` puts the test run in. Every
helper that creates something also knows how to remove exactly that, by name or by PID, so
tests can share the machine with other test runs.

Facts established on this machine (Debian 12, udev 252, kernel 6.18), relied on below:

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
- ext4 labels are at most 16 bytes (`personality-gameserver` would become `personality-game`);
  bookworm's mkfs.erofs (erofs-utils 1.5) cannot set a label at all, squashfs has none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from journal_fixture import read_journal

REPO = Path(__file__).resolve().parents[2]

UDEVD = "/lib/systemd/systemd-udevd"

# The log event the daemon writes (on stderr) once coldplug and reconcile are done.
READY_EVENT = "daemon_ready"

# Journal MESSAGE_IDs from DESIGN.md section 5 (the contract, not imported from the daemon).
MESSAGE_ID_CONFLICT = "3e47b2d0af514d77b3126415a1549afb"
MESSAGE_ID_STACK_CHANGED = "745778a2970b4475acba70df8299437b"
MESSAGE_ID_VOLUME_REFUSED = "18d0afe90a164b398024e69871a6bc44"
MESSAGE_ID_ROLLED_BACK = "091e1791abd44213b5aa028ad69c8fce"

# The udev property our session rule sets on loop devices backed by this session's files.
TEST_PROPERTY = "PERSONALITYD_TEST"

# Set to 1 to leave a udevd that the tests started running after the session.
KEEP_SERVICES_ENV = "PERSONALITYD_TEST_KEEP_SERVICES"

# Known base content of `sandbox_root`.
BASE_TOOL_BYTES = b"#!/bin/sh\necho base-tool from the base\n"
BASE_CONF = "# base.conf from the base\nsetting = base\n"
BASE_MOTD = "Welcome to the base system.\n"
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


# --------------------------------------------------------------------------------------------
# processes and commands


def run(*cmd: str | os.PathLike[str], timeout: float = 60) -> str:
    """Run a command, return its stdout; raise AssertionError with its stderr if it fails."""
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed (exit {proc.returncode}): {' '.join(args)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc.stdout


def pids_named(comm: str) -> set[int]:
    """PIDs of live (non-zombie) processes whose /proc/PID/comm is exactly `comm`."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().strip() != comm:
                    continue
            if _proc_state(int(entry.name)) == "Z":
                continue
        except OSError:
            continue
        found.add(int(entry.name))
    return found


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    return _proc_state(pid) not in (None, "Z")


def stop_pid(pid: int, comm: str | None = None, timeout: float = 10) -> None:
    """SIGTERM `pid`, wait up to `timeout`, then SIGKILL. With `comm`, only if it still has it."""
    if comm is not None and pid not in pids_named(comm):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def host_namespace_prefix() -> list[str]:
    """`nsenter` into PID 1's mount namespace when ours is a private one, else nothing.

    Long-lived global services (udevd) are started there so that they neither keep
    the test namespace (and the mounts in it) alive nor see the tests' mounts.
    """
    try:
        if os.readlink("/proc/1/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
            os.close(os.open("/proc/1/ns/mnt", os.O_RDONLY))  # what nsenter will need
            return ["nsenter", "--mount=/proc/1/ns/mnt", "--"]
    except OSError:
        pass  # PID 1's namespace is out of reach (as in some sandboxes): start it here
    return []


def keep_services() -> bool:
    return os.environ.get(KEEP_SERVICES_ENV) == "1"


# --------------------------------------------------------------------------------------------
# udev


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
        mains = [pid for pid in new if _ppid(pid) not in new]
        if mains and os.path.exists("/run/udev/control"):
            udev_settle()
            return min(mains)
        time.sleep(0.05)
    raise AssertionError(f"{UDEVD} --daemon started, but no systemd-udevd process appeared")


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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
    """One `UDEV` event as printed by `udevadm monitor --udev --property`."""

    action: str
    devpath: str
    properties: dict[str, str]

    @property
    def devname(self) -> str | None:
        return self.properties.get("DEVNAME")


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
        self._out = open(self.path, "w")
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
                raise AssertionError(f"udevadm monitor did not start: {self.path.read_text()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._out is not None:
            self._out.close()

    def events(self) -> list[UdevEvent]:
        events = []
        for block in self.path.read_text().split("\n\n"):
            lines = block.strip().splitlines()
            if not lines or not lines[0].startswith("UDEV "):
                continue
            head = lines[0].split()
            props = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
            events.append(UdevEvent(action=head[2], devpath=head[3], properties=props))
        return events

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
    rules_dir = Path("/run/udev/rules.d")
    rules_dir.mkdir(parents=True, exist_ok=True)
    for stale in rules_dir.glob("61-personalityd-test-s*-*.rules"):  # of sessions killed by -9
        pid = stale.name.removeprefix("61-personalityd-test-s").split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    rule = rules_dir / f"61-personalityd-test-{token}.rules"
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
        run("udevadm", "control", "--reload")


# --------------------------------------------------------------------------------------------
# journal


def journal_entries(
    message_id: str,
    *,
    since: float | None = None,
    min_count: int = 1,
    timeout: float = 5.0,
    **match: str | int,
) -> list[dict[str, Any]]:
    """Journal entries with MESSAGE_ID and all `match` fields (FIELD=value), oldest first.

    Runs `journalctl --no-pager -o json [--since=@EPOCH] MESSAGE_ID=... FIELD=value ...` (via
    `journal_fixture.read_journal`) until at least `min_count` entries are there or `timeout`
    seconds have passed, then returns what it found (possibly fewer; pass `min_count=0` to
    check for absence without waiting). Entries are readable as soon as journald has them; no
    `journalctl --sync`/`--flush` is needed. Repeated fields (e.g. PERSONALITY_SHADOWED) come
    back as lists in the order sent, single ones as strings.
    """
    args = [] if since is None else [f"--since=@{since:.6f}"]
    args.append(f"MESSAGE_ID={message_id}")
    args += [f"{key}={value}" for key, value in match.items()]
    return read_journal(*args, timeout=timeout, expect=min_count)


def field_list(entry: Mapping[str, Any], key: str) -> list[str]:
    """A journal field as a list, whether journalctl printed it once (str) or repeated (list)."""
    value = entry.get(key)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass
class JournalReader:
    """`journal_entries` limited to entries written since `since` (default: when created)."""

    since: float = field(default_factory=lambda: time.time() - 0.001)

    def entries(
        self, message_id: str, *, min_count: int = 1, timeout: float = 5.0, **match: str | int
    ) -> list[dict[str, Any]]:
        return journal_entries(
            message_id, since=self.since, min_count=min_count, timeout=timeout, **match
        )


# --------------------------------------------------------------------------------------------
# images

# File specs for `write_tree`/`build_image`: bytes or str is a regular file (mode 0755 when it
# starts with "#!", else 0644); tuples:
#   ("symlink", target)  ("dir",)  ("file", content, mode)  ("fifo",)  ("chardev", major, minor)
FileSpec = bytes | str | tuple[Any, ...]


def write_tree(src: Path, files: Mapping[str, FileSpec]) -> None:
    """Create `files` (root-relative paths, leading '/' optional) under directory `src`."""
    for rel, spec in files.items():
        path = src / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str):
            spec = spec.encode()
        if isinstance(spec, bytes):
            path.write_bytes(spec)
            path.chmod(0o755 if spec.startswith(b"#!") else 0o644)
            continue
        kind = spec[0]
        if kind == "symlink":
            path.symlink_to(spec[1])
        elif kind == "dir":
            path.mkdir(exist_ok=True)
        elif kind == "file":
            content = spec[1].encode() if isinstance(spec[1], str) else spec[1]
            path.write_bytes(content)
            path.chmod(spec[2])
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "chardev":
            os.mknod(path, 0o600 | 0o020000, os.makedev(spec[1], spec[2]))
        else:
            raise ValueError(f"{rel}: unknown file spec {spec!r}")


def format_os_release(fields: Mapping[str, str]) -> str:
    """os-release syntax: KEY="value" lines, with shell-special characters escaped."""
    lines = []
    for key, value in fields.items():
        escaped = re.sub(r'([\\"$`])', r"\\\1", str(value))
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _tree_bytes(src: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (math.ceil(st.st_size / 4096) + 1) * 4096
    return total


def _erofs_supports_label() -> bool:
    proc = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True, check=False)
    return re.search(r"^\s*-L", proc.stdout + proc.stderr, re.MULTILINE) is not None


def build_image(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    fmt: str = "squashfs",
    manifest: Mapping[str, str] | None = None,
    label: str | None = None,
    *,
    with_manifest: bool = True,
    manifest_dir: str = "usr/lib/extension-release.d",
) -> Path:
    """Build a personality image `name` from `files`; return the image path.

    The tree gets `<manifest_dir>/extension-release.<name>` with `manifest` in os-release syntax
    (default `ID=_any`; none at all with `with_manifest=False`). Formats: `squashfs`
    (`mksquashfs -all-root`), `erofs` (`mkfs.erofs --all-root`; bookworm's erofs-utils 1.5 has no
    `-L`, so a label fails there), `ext4` (`mkfs.ext4 -d`, sized from the tree, at least 4 MiB;
    labels of at most 16 bytes).
    Images go to `tmp_path/images/<name>.<fmt>` (`<name>-2.<fmt>` ... if taken).
    """
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    src = _unique(images / f"{name}.tree")
    src.mkdir()
    write_tree(src, files)
    if with_manifest:
        release = src / manifest_dir / f"extension-release.{name}"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text(format_os_release(manifest if manifest is not None else {"ID": "_any"}))
    image = _unique(images / f"{name}.{fmt}")
    if fmt == "squashfs":
        run("mksquashfs", src, image, "-noappend", "-quiet", "-no-progress", "-all-root")
    elif fmt == "erofs":
        cmd = ["mkfs.erofs", "--quiet", "--all-root"]
        if label is not None:
            if not _erofs_supports_label():
                raise AssertionError("this mkfs.erofs has no -L: erofs images cannot be labelled")
            cmd += ["-L", label]
        run(*cmd, image, src)
    elif fmt == "ext4":
        if label is not None and len(label.encode()) > 16:
            raise AssertionError(f"ext4 labels have at most 16 bytes: {label!r}")
        size = max(4 << 20, 2 * _tree_bytes(src) + (2 << 20))
        with open(image, "wb") as f:
            f.truncate(size)
        cmd = ["mkfs.ext4", "-q", "-d", str(src)]
        if label is not None:
            cmd += ["-L", label]
        run(*cmd, image)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return image


def build_writable_image(
    tmp_path: Path, label: str = "personality-data", size_mb: int = 32
) -> Path:
    """An empty ext4 image labelled `label` for the writable volume."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    image = _unique(images / f"{label}.ext4")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    run("mkfs.ext4", "-q", "-L", label, image)
    return image


# --------------------------------------------------------------------------------------------
# loop devices


def loop_backing_file(dev: str) -> str | None:
    """The backing file of /dev/loopN as the kernel reports it, or None when not set up."""
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


class LoopDevices:
    """Loop devices attached by one test; `cleanup()` detaches the ones still ours.

    A device counts as ours while its backing file is the image we attached, so a loop number
    that was freed and taken by someone else in the meantime is never touched.
    """

    def __init__(self) -> None:
        self.attached: dict[str, Path] = {}

    def attach(self, image: Path, read_only: bool = True) -> str:
        """`losetup --find --show [--read-only] IMAGE`; waits until udev has probed it."""
        args = ["losetup", "--find", "--show"]
        if read_only:
            args.append("--read-only")
        dev = run(*args, image).strip()
        self.attached[dev] = image.resolve()
        udev_settle()
        wait_udev_property(dev, "ID_FS_TYPE")
        return dev

    def is_ours(self, dev: str) -> bool:
        image = self.attached.get(dev)
        backing = loop_backing_file(dev)
        return image is not None and backing is not None and Path(backing) == image

    def detach(self, dev: str, settle: bool = True) -> None:
        """`losetup -d DEV` (if still ours); on a busy device the kernel defers it (autoclear)."""
        if self.is_ours(dev):
            proc = subprocess.run(
                ["losetup", "-d", dev], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0 and self.is_ours(dev):
                raise AssertionError(f"losetup -d {dev} failed: {proc.stderr.strip()}")
        self.attached.pop(dev, None)
        if settle:
            udev_settle()

    def yank(self, dev: str) -> None:
        """Surprise removal as the daemon sees it: `losetup -d DEV`, then a `remove` uevent.

        Found by experiment (udev 252): `losetup -d` alone never produces a `remove` event. On
        an idle device it gives two `change` events without `ID_FS_*`; on a busy device (one
        the daemon has mounted) it gives no event at all and only sets autoclear, the device
        working on until its last mount goes. `udevadm trigger --action=remove --settle
        /sys/block/loopN` then delivers a `remove` event (with the old properties) to every
        udev listener, busy or not: for a busy device with the old properties (ID_FS_TYPE...),
        for an idle one without them (the `change` events of the detach cleared them first).
        So after `yank` the daemon has seen `remove`; the kernel frees a busy device (two more
        `change` events, no ID_FS_*) once the daemon has unmounted it.
        """
        if not self.is_ours(dev):
            raise AssertionError(f"{dev} is not a loop device this test attached")
        image = self.attached.pop(dev)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        backing = loop_backing_file(dev)
        if backing is not None and Path(backing) != image:
            return  # freed and already taken by someone else: their device, not ours to touch
        run("udevadm", "trigger", "--action=remove", "--settle", f"/sys/block/{Path(dev).name}")
        # Still ours (busy, autoclear pending): keep it on the list so cleanup re-checks it.
        if backing is not None:
            self.attached[dev] = image

    def cleanup(self) -> None:
        """Detach every device this object attached that is still attached to our image."""
        with contextlib.suppress(AssertionError):
            udev_settle()
        errors = []
        for dev in list(self.attached):
            try:
                self.detach(dev, settle=False)
            except AssertionError as e:
                errors.append(str(e))
        with contextlib.suppress(AssertionError):
            udev_settle()
        if errors:
            raise AssertionError("; ".join(errors))


# --------------------------------------------------------------------------------------------
# mounts


def _unescape_mountinfo(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) for each line of /proc/self/mountinfo, in order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = _unescape_mountinfo(left.split()[4])
            fstype, source = right.split()[:2]
            result.append((mount_point, fstype, _unescape_mountinfo(source)))
    return result


def mounts_snapshot() -> set[tuple[str, str, str]]:
    """The set of (mount point, fstype, source) mounted now, for leftover-mount checks."""
    return set(mountinfo())


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, in mount order (parents before children)."""
    prefix = str(path).rstrip("/")
    return [mp for mp, _, _ in mountinfo() if mp == prefix or mp.startswith(prefix + "/")]


def unmount_tree(path: Path) -> None:
    """Lazily unmount everything at or below `path`, innermost and newest first.

    Only for trees a test owns (its tmp dir) inside the test's private mount namespace.
    """
    for _ in range(100):
        points = mounts_under(path)
        if not points:
            return
        for mp in reversed(points):
            subprocess.run(["umount", "--lazy", mp], capture_output=True, check=False)
    raise AssertionError(f"mounts left under {path}: {mounts_under(path)}")


# --------------------------------------------------------------------------------------------
# sandbox root


def make_sandbox_root(root: Path) -> Path:
    """A minimal base OS tree at `root` (Debian 12 os-release, usr/bin/base-tool, etc/...)."""
    write_tree(
        root,
        {
            "usr/bin/base-tool": BASE_TOOL_BYTES,
            "usr/sbin": ("dir",),
            "usr/lib/os-release": OS_RELEASE,
            "usr/share/doc": ("dir",),
            "etc/os-release": OS_RELEASE,
            "etc/base.conf": BASE_CONF,
            "etc/motd": BASE_MOTD,
            "opt": ("dir",),
            "var": ("dir",),
            "run": ("dir",),
        },
    )
    return root


# --------------------------------------------------------------------------------------------
# daemon

DEFAULT_PATHS = {
    "mount_root": "/opt/personality",
    "spool": "/var/spool/personalityd",
    "state": "/var/lib/personalityd",
    "runtime": "/run/personalityd",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """TOML for a config dict: top-level scalars first, then one [table] per nested dict."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, Mapping)]
    for table, body in config.items():
        if isinstance(body, Mapping):
            lines.append(f"\n[{table}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursing into tables; a None value deletes the key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Daemon:
    """personalityd run as a subprocess on a sandbox root, the way a user starts it.

    `python -m personalityd --config CFG --root ROOT`, stderr appended to `log_path`. The config
    sets `root`, the DESIGN default paths (relative to root), and, when `udev_token` is given,
    `volumes.match` / `writable.match` restricted to loop devices tagged by `udev_tag_rule`.
    `config` overrides are deep-merged on top (None deletes a key).
    """

    def __init__(
        self,
        root: Path,
        workdir: Path,
        *,
        udev_token: str | None = None,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "personalityd",
    ) -> None:
        self.root = root
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.env = dict(env or {})
        base: dict[str, Any] = {
            "root": str(root),
            "volumes": {"mount_root": DEFAULT_PATHS["mount_root"]},
            "writable": {"fallback": "none"},
            "spool": {"dir": DEFAULT_PATHS["spool"]},
            "state": {"dir": DEFAULT_PATHS["state"], "runtime_dir": DEFAULT_PATHS["runtime"]},
        }
        if udev_token is not None:
            base["volumes"]["match"] = [{TEST_PROPERTY: udev_token}]
            base["writable"]["match"] = [
                {"ID_FS_LABEL": "personality-data", TEST_PROPERTY: udev_token}
            ]
        self.config: dict[str, Any] = deep_merge(base, config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # paths, as configured, seen from the test (outside the daemon's root prefix)
    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @property
    def spool_dir(self) -> Path:
        return self.path(self.config.get("spool", {}).get("dir", DEFAULT_PATHS["spool"]))

    @property
    def state_dir(self) -> Path:
        return self.path(self.config.get("state", {}).get("dir", DEFAULT_PATHS["state"]))

    @property
    def runtime_dir(self) -> Path:
        state = self.config.get("state", {})
        return self.path(state.get("runtime_dir", DEFAULT_PATHS["runtime"]))

    @property
    def mount_root(self) -> Path:
        volumes = self.config.get("volumes", {})
        return self.path(volumes.get("mount_root", DEFAULT_PATHS["mount_root"]))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def update_config(self, overrides: Mapping[str, Any]) -> None:
        """Deep-merge `overrides` into the config; takes effect at the next (re)start."""
        self.config = deep_merge(self.config, overrides)

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def start(self, wait: bool = True, timeout: float = 30) -> None:
        """Write the config, start the daemon, and (by default) `wait_ready()`."""
        if self.running():
            raise AssertionError(f"{self.name} is already running (PID {self.pid})")
        self.write_config()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "daemon"), env.get("PYTHONPATH")) if p
        )
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            marker = f"--- {self.name} started at {time.strftime('%H:%M:%S')} ---\n"
            log.write(marker.encode())
            log.flush()
            self._log_offset += len(marker)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "personalityd",
                    "--config",
                    str(self.config_path),
                    "--root",
                    str(self.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.config_path.parent,
            )
        if wait:
            self.wait_ready(timeout)

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ready(self) -> bool:
        """The spool and state dirs exist and this run has logged `daemon_ready`."""
        return (
            self.spool_dir.is_dir()
            and self.state_dir.is_dir()
            and READY_EVENT in self._log_since_start()
        )

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait for `ready()`; fail at once (with the log) if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(
                    f"{self.name} exited (status {code}) before {READY_EVENT}:\n"
                    + self._log_since_start()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} not ready after {timeout} s:\n" + self._log_since_start()
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit status (None if not run)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon (a crash: no cleanup runs) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, wait: bool = True, timeout: float = 30) -> None:
        self.stop()
        self.start(wait=wait, timeout=timeout)

    def log_text(self) -> str:
        """Everything the daemon wrote to stderr/stdout, over all (re)starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(
        self, body: Mapping[str, Any], name: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """`spool_request` against this daemon's spool dir."""
        return spool_request(self.root, body, name=name, timeout=timeout, spool_dir=self.spool_dir)


def drop(spool: Path, name: str, body: Mapping[str, Any] | str | bytes) -> None:
    """Write a request as a dotfile, then rename it in as `<name>.json` (DESIGN section 6)."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    tmp = spool / f".tmp-{name}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.rename(spool / f"{name}.json")


def spool_request(
    root: Path,
    body: Mapping[str, Any] | str | bytes,
    name: str | None = None,
    timeout: float = 30,
    *,
    spool_dir: Path | None = None,
) -> dict[str, Any]:
    """Submit one spool request and wait for its result.

    Writes `<spool>/.tmp-<name>`, renames it to `<name>.json`, waits for
    `<spool>/done/<name>.result.json` or `<spool>/failed/<name>.result.json`, and returns the
    parsed result with one extra key, `"_dir"`: `"done"` or `"failed"`. `body` may be raw
    str/bytes to send malformed requests. The spool defaults to `root/var/spool/personalityd`.
    """
    spool = spool_dir if spool_dir is not None else root / DEFAULT_PATHS["spool"].lstrip("/")
    name = name or f"req-{uuid.uuid4().hex[:12]}"
    drop(spool, name, body)
    deadline = time.monotonic() + timeout
    while True:
        for where in ("done", "failed"):
            result_path = spool / where / f"{name}.result.json"
            try:
                result: dict[str, Any] = json.loads(result_path.read_text())
            except FileNotFoundError:
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # being written; the daemon should rename it in, but be tolerant
            result["_dir"] = where
            return result
        if time.monotonic() > deadline:
            listing = sorted(str(p.relative_to(spool)) for p in spool.rglob("*"))
            raise AssertionError(f"no result for spool request {name} after {timeout} s: {listing}")
        time.sleep(0.05)


def wait_for(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll `predicate` every 50 ms until true; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def remove_tree(path: Path) -> None:
    """rm -rf a test-owned tree, after lazily unmounting anything still mounted inside it."""
    unmount_tree(path)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


@dataclass(frozen=True)
class MemberUser:
    """A temporary system user in the `personality` group (see the `member_user` fixture)."""

    name: str
    uid: int
    gid: int

    @property
    def setpriv(self) -> tuple[str, ...]:
        return ("setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups")
