"""Running commands, and finding and stopping processes by PID (never by name alone)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

# Set to 1 to leave a udevd that the tests started running after the session.
KEEP_SERVICES_ENV = "PERSONALITYD_TEST_KEEP_SERVICES"


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


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z, ...), or None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def ppid(pid: int) -> int | None:
    """The parent PID of `pid`, or None when there is no such process."""
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else None
    except (ValueError, IndexError):
        return None


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
        except OSError:
            continue
        if proc_state(int(entry.name)) in (None, "Z"):
            continue
        found.add(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z")


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_pid(pid: int, comm: str | None = None, timeout: float = 10) -> None:
    """SIGTERM `pid`, wait up to `timeout`, then SIGKILL. With `comm`, only if it still has it."""
    if comm is not None and pid not in pids_named(comm):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, timeout)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10
) -> None:
    """SIGTERM a child we started, wait up to `timeout`, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    """True when PERSONALITYD_TEST_KEEP_SERVICES=1: leave the services we started running."""
    return os.environ.get(KEEP_SERVICES_ENV) == "1"
