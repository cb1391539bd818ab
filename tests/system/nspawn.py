"""Helpers for the system tests: a Debian rootfs, the package in it, and systemd booted in it.

A debootstrap'ed bookworm (minbase plus systemd, dbus, udev, python3 and the package's
dependencies) is built once and cached as a tarball under `.cache/system/` (git-ignored); each
test session unpacks a copy, installs the `.deb` into it with dpkg, and boots it with
`systemd-nspawn --boot`. Commands run inside with `nsenter` into the namespaces of the
container's PID 1 (there is no machined on the host, so no `machinectl`/`systemd-run -M`).

Facts established on the development machine (Debian 12 host without systemd as PID 1, cgroup v1
hybrid layout, kernel 6.18, systemd-nspawn 252), relied on below:

- nspawn boots the container with `--register=no --keep-unit` on the hybrid layout as is
  (no `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY`); it splits the cgroup it was started in into
  `payload/` (the container) and `supervisor/` (itself) and leaves both behind. So every boot
  starts nspawn in a cgroup of its own (`<hierarchy>/pdsys-<token>`) that is removed after.
- Kernel uevents reach the container's network namespace (it is owned by the initial user
  namespace), so a udevd inside sees them, but it cannot probe a device without its node, and
  nspawn's /dev has none: each loop device is bound in (`--bind=/dev/loopN`).
- nspawn mounts sysfs read-only, so udevd's units are skipped (ConditionPathIsReadWrite=/sys)
  and `udevadm trigger` fails with EROFS (the read-only flag is on the container's sysfs
  superblock; a rw bind mount inside does not help). The host's sysfs is writable: the test
  binds the `uevent` file of each of its loop devices in (`/run/pdtest-uevent/loopN`), and a
  drop-in makes systemd-udev-trigger.service write `add` there instead of triggering all
  devices. Only this test's devices are re-triggered; the host's udevd sees those events too,
  which is harmless.
- nspawn leaves `/run/systemd/nspawn/propagate/<machine>` behind on a host whose /run is not a
  tmpfs ("we can't allow that"); it is removed after each boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "system"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What the rootfs needs besides minbase: an init, the bus, udev, and the package's Depends
# (dpkg -i in the unpacked copy must not need the network).
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "python3",
    "python3-pyudev",
    "python3-systemd",
    "procps",
    # The Debian stacks test asks the web stack for its PHP page from inside.
    "curl",
)
# Bump to rebuild cached rootfs tarballs when the way they are made changes.
ROOTFS_RECIPE = "1"
# Content of the test personalities, checked through the stack.
WEB_INDEX = "hello from the web personality\n"
DEMO_STATE = "demo-web running from the demo personality"
# Set to 1 to keep a session's run directory (rootfs, logs) for a look after the run.
KEEP_ENV = "PERSONALITYD_SYSTEM_KEEP"
# What the demo personality declares (sysusers.d, tmpfiles.d) and ships (a library, and a
# systemd-sysusers of its own that leaves a marker if it is ever run).
DEMO_USER = "demo-svc"
DEMO_LIBRARY = "liblzo2.so.2"
FAKE_TOOL_MARKER = "/run/personality-tool-ran"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandFailed(AssertionError):
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"command failed (exit {proc.returncode}): {shlex.join(args)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )


def run(
    *cmd: str | os.PathLike[str], timeout: float = 120, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, input=input
    )
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc)
    return proc


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# the rootfs


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else the default."""
    override = os.environ.get("PERSONALITYD_SYSTEM_MIRROR")
    if override:
        return override
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "main" in fields.get("Components", "").split():
                    return str(fields.get("URIs", "")).split()[0]
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 4 and parts[0] == "deb" and parts[2] == SUITE:
                    return next(p for p in parts[1:] if not p.startswith("["))
    return DEFAULT_MIRROR


def rootfs_tarball() -> Path:
    """The cached rootfs tarball, built with debootstrap when missing (under a lock)."""
    mirror = apt_mirror()
    key = hashlib.sha256(
        json.dumps([ROOTFS_RECIPE, SUITE, mirror, ROOTFS_PACKAGES]).encode()
    ).hexdigest()[:16]
    tarball = CACHE / f"rootfs-{SUITE}-{key}.tar.zst"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        build = CACHE / f"build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        try:
            run(
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(ROOTFS_PACKAGES)}",
                SUITE,
                build,
                mirror,
                timeout=900,
            )
            _prepare_rootfs(build)
            partial = tarball.with_name(tarball.name + f".{os.getpid()}.tmp")
            run(
                "tar", "-C", build, "--numeric-owner", "--xattrs", "-I", "zstd -T0 -3",
                "-cf", partial, ".",
                timeout=600,
            )  # fmt: skip
            partial.rename(tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def _prepare_rootfs(root: Path) -> None:
    """What every copy needs whatever is installed: no apt caches, no root login prompt."""
    run("chroot", root, "apt-get", "clean")
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    # Each boot gets a machine ID from nspawn; an empty file means "not committed yet".
    (root / "etc/machine-id").write_text("")
    # No gettys on the container console (nspawn's console is a pipe here).
    run("chroot", root, "systemctl", "mask", "console-getty.service")


def unpack_rootfs(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    run("tar", "-C", dest, "--numeric-owner", "--xattrs", "-I", "zstd", "-xf", tarball, timeout=600)
    return dest


def install_deb(root: Path, deb: Path) -> str:
    """dpkg -i the package inside `root` (chroot); its Depends must already be there."""
    target = root / "root" / deb.name
    shutil.copy2(deb, target)
    try:
        proc = run("chroot", root, "dpkg", "-i", f"/root/{deb.name}", timeout=300)
    finally:
        target.unlink(missing_ok=True)
    return proc.stdout + proc.stderr


def write_file(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    os.chmod(target, mode)
    return target


def enable_unit(root: Path, unit: str, target: str = "multi-user.target") -> None:
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{unit}")


def write_udev_config(root: Path) -> None:
    """udev in a container: run udevd although /sys is read-only, and replace the coldplug
    trigger of all devices by an `add` for the test's loop devices only (their host uevent
    files, bound in at /run/pdtest-uevent by `Container`)."""
    for unit in (
        "systemd-udevd.service",
        "systemd-udevd-kernel.socket",
        "systemd-udevd-control.socket",
    ):
        write_file(
            root,
            f"/etc/systemd/system/{unit}.d/50-system-test.conf",
            "[Unit]\nConditionPathIsReadWrite=\n",
        )
    write_file(
        root,
        "/etc/systemd/system/systemd-udev-trigger.service.d/50-system-test.conf",
        "[Unit]\nConditionPathIsReadWrite=\n\n"
        "[Service]\nExecStart=\nExecStart=/usr/local/sbin/system-test-coldplug\n",
    )
    write_file(
        root,
        "/usr/local/sbin/system-test-coldplug",
        "#!/bin/sh\n"
        "# The host's uevent files of the test's loop devices, bound in by the test.\n"
        "for f in /run/pdtest-uevent/*; do\n"
        '    [ -e "$f" ] && echo add > "$f"\n'
        "done\n"
        "exit 0\n",
        mode=0o755,
    )


# --------------------------------------------------------------------------------------------
# run directories


def _process_identity(pid: int) -> str | None:
    """PID plus its start time, so a reused PID is not taken for the same process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def new_run_dir() -> Path:
    """`.cache/system/run-<token>/`, marked as ours, after sweeping runs whose owner died."""
    sweep_stale_runs()
    path = CACHE / f"run-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    (path / "owner").write_text(_process_identity(os.getpid()) or "")
    return path


@contextlib.contextmanager
def run_dir() -> Iterator[Path]:
    """A new run directory, removed after (kept, marked `keep`, when `KEEP_ENV` is 1)."""
    path = new_run_dir()
    yield path
    if os.environ.get(KEEP_ENV) == "1":
        (path / "keep").write_text("")
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale_runs() -> None:
    """Clean up after test runs that were killed before their own cleanup: their loop devices,
    nspawn cgroups and propagation dirs, and the run directory. A run is stale when the
    process that wrote its `owner` file is gone."""
    for run_dir in sorted(CACHE.glob("run-*")):
        try:
            owner = (run_dir / "owner").read_text().strip()
        except OSError:
            continue
        if owner and _process_identity(int(owner.split()[0])) == owner:
            continue  # still running
        if (run_dir / "keep").exists():
            continue  # kept on purpose (PERSONALITYD_SYSTEM_KEEP=1); its loops are detached
        try:
            machine = (run_dir / "machine").read_text().strip()
        except OSError:
            machine = ""
        if machine and _cgroup_busy(machine):
            continue  # its container is still shutting down
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):
                if Path(backing_path(backing)).parent == run_dir.resolve():
                    run("losetup", "-d", f"/dev/{backing.parent.parent.name}", check=False)
        if machine.startswith("pdsys-"):
            for hierarchy in _cgroup_hierarchies():
                _remove_cgroup_tree(hierarchy / machine)
            shutil.rmtree(Path("/run/systemd/nspawn/propagate") / machine, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# images and loop devices


def backing_path(sysfs_file: Path) -> str:
    """A loop device's backing file as the kernel names it: the real path (`.cache` may be a
    symlink), with " (deleted)" taken off once the file is gone."""
    text = sysfs_file.read_text().strip()
    return text.removesuffix(" (deleted)")


def build_image(
    workdir: Path, name: str, files: Mapping[str, str | bytes], manifest: Mapping[str, str]
) -> Path:
    """A squashfs personality image with `files` and the sysext manifest `manifest`."""
    tree = workdir / f"{name}.tree"
    shutil.rmtree(tree, ignore_errors=True)
    release = dict(manifest)
    files = {
        **files,
        f"usr/lib/extension-release.d/extension-release.{name}": "".join(
            f"{k}={shlex.quote(v)}\n" for k, v in release.items()
        ),
    }
    for rel, content in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if rel.startswith(("usr/bin/", "usr/lib/demo-web/")):
            os.chmod(path, 0o755)
    image = workdir / f"{name}.squashfs"
    image.unlink(missing_ok=True)
    run("mksquashfs", tree, image, "-noappend", "-quiet", "-no-progress", "-all-root")
    return image


@dataclass
class LoopDevices:
    """Loop devices this session attached, detached by name at the end (while still backed by
    our file)."""

    attached: dict[str, Path] = field(default_factory=dict)

    def attach(self, image: Path, read_only: bool = True) -> str:
        args = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)]
        dev = run(*args).stdout.strip()
        self.attached[dev] = image
        return dev

    def cleanup(self) -> None:
        for dev, image in list(self.attached.items()):
            backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
            with contextlib.suppress(OSError):
                if backing_path(backing) == os.path.realpath(image):
                    run("losetup", "-d", dev, check=False)
            del self.attached[dev]


@contextlib.contextmanager
def attached_loops() -> Iterator[LoopDevices]:
    """Loop devices to attach, detached when the block ends."""
    held = LoopDevices()
    try:
        yield held
    finally:
        held.cleanup()


# --------------------------------------------------------------------------------------------
# cgroups


def _cgroup_hierarchies() -> list[Path]:
    """Mount points (plus our own cgroup path) of the hierarchies nspawn uses: the unified
    one (cgroup2) and, on a hybrid/legacy host, the name=systemd one."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        own[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _source, options = [*right.split(), "", ""][:3]
        mountpoint = left.split()[4]
        if fstype == "cgroup2":
            found.append(Path(mountpoint) / own.get("", "/").lstrip("/"))
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            found.append(Path(mountpoint) / own.get("name=systemd", "/").lstrip("/"))
    return found


def _cgroup_busy(name: str) -> bool:
    """Whether any process is left in our cgroup `name` (in any hierarchy)."""
    for hierarchy in _cgroup_hierarchies():
        for procs in (hierarchy / name).glob("**/cgroup.procs"):
            with contextlib.suppress(OSError):
                if procs.read_text().strip():
                    return True
    return False


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for dirpath, _dirnames, _files in sorted(os.walk(path), key=lambda e: -len(e[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


# --------------------------------------------------------------------------------------------
# the container


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """systemd booted with systemd-nspawn in `root`, driven with nsenter.

    `boot()` starts it and waits until `systemctl is-system-running` says the boot is done;
    `poweroff()` shuts it down cleanly and waits for nspawn to exit; `cleanup()` makes sure
    nothing of ours is left (nspawn, its cgroups, its propagation dir).
    """

    def __init__(self, root: Path, workdir: Path, loops: Sequence[str]) -> None:
        self.root = root
        self.workdir = workdir
        self.loops = list(loops)
        self.name = f"pdsys-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.nspawn_pid: int | None = None
        self.boots = 0
        self.cgroups = [h / self.name for h in _cgroup_hierarchies()]
        (workdir / "machine").write_text(self.name)

    # -- lifecycle --------------------------------------------------------------------------

    def nspawn_command(self) -> list[str]:
        cmd = [
            "systemd-nspawn",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--capability=all",
            f"--machine={self.name}",
            f"--directory={self.root}",
            "--console=pipe",
        ]
        for dev in self.loops:
            kernel = Path(dev).name
            cmd.append(f"--bind={dev}")
            cmd.append(f"--bind=/sys/class/block/{kernel}/uevent:/run/pdtest-uevent/{kernel}")
        return cmd

    def boot(self, timeout: float = 120) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.boots += 1
        for cgroup in self.cgroups:
            cgroup.mkdir(exist_ok=True)
        procs = " ".join(shlex.quote(str(c / "cgroup.procs")) for c in self.cgroups)
        # nspawn runs under a shell that stays its parent and forwards SIGTERM to it (nspawn
        # halts the container cleanly), also when the shell gets it because the test run died
        # (setpriv --pdeathsig: nspawn itself does not keep a parent-death signal). The child
        # joins the test's own cgroups before it becomes nspawn.
        join_cgroups = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
        script = (
            """trap 'kill -TERM "$child" 2>/dev/null' TERM; """
            f'sh -c {shlex.quote(join_cgroups)} sh "$@" & child=$!; '
            'while kill -0 "$child" 2>/dev/null; do wait "$child"; done'
        )
        log = open(self.workdir / f"nspawn-{self.boots}.log", "wb")  # noqa: SIM115
        env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8"}
        self.nspawn_pid = None
        guarded = ["setpriv", "--pdeathsig", "TERM", "--", "sh", "-c", script, "sh"]
        self.proc = subprocess.Popen(
            [*guarded, *self.nspawn_command()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.leader = None
        deadline = time.monotonic() + timeout
        wait_until(self._find_leader, timeout, "the container's PID 1")
        # Early in the boot systemctl cannot connect yet ("Failed to connect to bus"), and
        # prints no state: retry until it can, then let --wait wait for the boot to finish.
        while True:
            remaining = max(5.0, deadline - time.monotonic())
            proc = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
            )
            state = proc.stdout.strip()
            if state or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise AssertionError(
                f"container boot ended {state!r} ({proc.stderr.strip()}); failed units:\n"
                f"{failed}\njournal:\n{self.journal(lines=80)}"
            )

    def _find_leader(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited ({self.proc.returncode}) during boot:\n{self.nspawn_log()}"
            )
        for nspawn in _children(self.proc.pid):
            if _comm(nspawn) != "systemd-nspawn":
                continue
            self.nspawn_pid = nspawn
            for child in _children(nspawn):
                if _comm(child) == "systemd":
                    self.leader = child
                    return True
        return False

    def nspawn_log(self) -> str:
        path = self.workdir / f"nspawn-{self.boots}.log"
        try:
            return path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poweroff(self, timeout: float = 90) -> None:
        """`systemctl poweroff` inside, then wait for nspawn to exit."""
        if not self.running:
            return
        assert self.proc is not None
        self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate()
            raise AssertionError(f"the container did not power off within {timeout} s") from None
        self.leader = None
        self._after_exit()

    def _terminate(self) -> None:
        """Stop nspawn by PID: SIGTERM (clean halt), again (immediate), then SIGKILL."""
        assert self.proc is not None
        steps = ((signal.SIGTERM, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10))
        for sig, wait in steps:
            if self.proc.poll() is not None:
                break
            # SIGTERM goes through the shell, which forwards it; SIGKILL to both.
            targets = [self.proc.pid] if sig == signal.SIGTERM else [self.nspawn_pid, self.proc.pid]
            for pid in targets:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        self.leader = None
        self._after_exit()

    def _after_exit(self) -> None:
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)

    def cleanup(self) -> None:
        if self.running:
            with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                self.poweroff(timeout=60)
        if self.running:
            self._terminate()
        for cgroup in self.cgroups:
            _remove_cgroup_tree(cgroup)
        self._after_exit()

    # -- inside -----------------------------------------------------------------------------

    def command(self, *cmd: str, user: str | None = None) -> list[str]:
        assert self.leader is not None, "the container is not running"
        inner = list(cmd)
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        return [
            "nsenter",
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--",
            "env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            *inner,
        ]

    def run(
        self,
        *cmd: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.command(*cmd, user=user), check=check, timeout=timeout, input=input)

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def is_active(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def wait_active(self, unit: str, state: str = "active", timeout: float = 60) -> None:
        wait_until(lambda: self.is_active(unit) == state, timeout, f"{unit} to be {state}")

    def read(self, path: str) -> str:
        """A file as processes in the container see it (its mounts are not visible outside)."""
        return self.run("cat", path).stdout

    def journal(self, *args: str, lines: int = 200) -> str:
        if not self.running:
            return "(container not running)"
        proc = self.run(
            "journalctl", "--no-pager", "-b", "-n", str(lines), *args, check=False, timeout=30
        )
        return proc.stdout + proc.stderr

    def personalities(self) -> dict[str, str]:
        """name -> state, from `personalityctl list --json` run as root inside."""
        out = self.run("personalityctl", "list", "--json").stdout
        data = json.loads(out)
        items = data.get("personalities", data) if isinstance(data, dict) else data
        return {item["name"]: item["state"] for item in items}


@contextlib.contextmanager
def booted(container: Container) -> Iterator[Container]:
    try:
        container.boot()
        yield container
    finally:
        container.cleanup()
