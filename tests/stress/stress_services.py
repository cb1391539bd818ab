"""The services around the daemon fail: journald stops, udevd restarts, the state fs fills up.

Only services started by this test session are stopped. journald: the test mounts tmpfs over
/run/systemd/journal and /run/log/journal inside the test's private mount namespace and starts
a journald of its own there, so the machine's journald (whoever runs it) is never touched and
the daemon under test (same namespace) talks to ours. udevd: the session always runs its own,
in its own network namespace on a private /run/udev (`testkit.udevd`); the test stops and
starts that one, and a udevd the machine runs never hears of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from testkit.contract import MESSAGE_ID_STACK_CHANGED
from testkit.daemon import Daemon
from testkit.images import build_image
from testkit.journal import JOURNALD, journal_listening
from testkit.loops import LoopDevices
from testkit.polling import wait_for
from testkit.processes import pid_alive, run
from testkit.stack import expect_stack, files_of, state_of
from testkit.udevd import PrivateUdevd

JOURNAL_DIRS = ("/run/systemd/journal", "/run/log/journal")


def _mount_tmpfs(path: str, size: str = "64m") -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True
    )


def _umount(path: str) -> None:
    subprocess.run(["umount", "--lazy", path], check=False)


@contextlib.contextmanager
def private_journal_dirs() -> Iterator[None]:
    for path in JOURNAL_DIRS:
        _mount_tmpfs(path)
    try:
        yield
    finally:
        for path in JOURNAL_DIRS:
            _umount(path)


class PrivateJournald:
    """A journald of our own on the tmpfs-covered journal dirs; stopped by its PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [JOURNALD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(journal_listening, 60, "our journald's socket")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        # The socket file stays behind, as when journald dies: nothing listens on it.
        assert not journal_listening()


def _entries(generation: int) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            "journalctl",
            "--directory=/run/log/journal",
            "--no-pager",
            "-o",
            "json",
            f"MESSAGE_ID={MESSAGE_ID_STACK_CHANGED}",
            f"PERSONALITY_GENERATION={generation}",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_journald_stopped_while_the_daemon_runs(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    trees = {n: files_of(n, 10) for n in ("j1", "j2", "j3")}
    for name, tree in trees.items():
        loop_devices.attach(build_image(tmp_path, name, tree))
    journald = PrivateJournald()
    with private_journal_dirs():
        journald.start()
        try:
            daemon.start()
            one = daemon.request({"action": "attach", "personality": "j1"})
            assert one["status"] == "ok", one
            wait_for(lambda: bool(_entries(one["generation"])), 120, "the first entry")
            journald.stop()
            two = daemon.request({"action": "attach", "personality": "j2"})
            assert two["status"] == "ok", two  # keeps working without journald
            assert "journal_unavailable" in daemon.log_text()
            assert "event=stack_changed generation=" + str(two["generation"]) in daemon.log_text()
            journald.start()
            three = daemon.request({"action": "attach", "personality": "j3"})
            assert three["status"] == "ok", three
            wait_for(lambda: bool(_entries(three["generation"])), 120, "entries to resume")
            assert not _entries(two["generation"])  # lost while journald was away, as logged
            expect_stack(daemon, ["j1", "j2", "j3"], trees)
        finally:
            daemon.stop()
            journald.stop()


def test_udevd_restarted(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, udevd: PrivateUdevd
) -> None:
    trees = {n: files_of(n, 10) for n in ("u1", "u2", "u3")}
    loop_devices.attach(build_image(tmp_path, "u1", trees["u1"]))
    daemon.start()
    assert daemon.request({"action": "attach", "personality": "u1"})["status"] == "ok"
    first = udevd.pid
    udevd.stop()
    # While ours is down nothing tells the daemon of a new device: a udevd the machine runs
    # handles the kernel's event in another network namespace, out of the daemon's hearing.
    image = build_image(tmp_path, "u3", trees["u3"])
    u3 = run("losetup", "--find", "--show", "--read-only", image).strip()
    loop_devices.attached[u3] = image.resolve()  # detached by the fixture like the others
    missed = daemon.request({"action": "attach", "personality": "u3", "timeout": 3}, timeout=60)
    assert (missed["status"], missed["code"]) == ("error", "timeout"), missed
    udevd.start()
    assert udevd.pid != first and not pid_alive(first)
    loop_devices.attach(build_image(tmp_path, "u2", trees["u2"]))
    result = daemon.request({"action": "attach", "personality": "u2", "timeout": 60}, timeout=90)
    assert result["status"] == "ok", result
    # The event ours missed, replayed for that one device, as an admin would after the restart.
    run("udevadm", "trigger", "--action=change", "--settle", f"/sys/block/{Path(u3).name}")
    result = daemon.request({"action": "attach", "personality": "u3", "timeout": 60}, timeout=90)
    assert result["status"] == "ok", result
    expect_stack(daemon, ["u1", "u2", "u3"], trees)


def test_state_filesystem_full(daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path) -> None:
    trees = {n: files_of(n, 10) for n in ("s1", "s2")}
    for name, tree in trees.items():
        loop_devices.attach(build_image(tmp_path, name, tree))
    daemon.start()
    assert daemon.request({"action": "attach", "personality": "s1"})["status"] == "ok"
    state_dir = daemon.state_dir
    saved = (state_dir / "state.json").read_bytes()
    _mount_tmpfs(str(state_dir), size="16k")
    try:
        (state_dir / "state.json").write_bytes(saved)
        with contextlib.suppress(OSError), open(state_dir / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        result = daemon.request({"action": "attach", "personality": "s2"})
        assert result["status"] == "error", result
        assert result["attached"] == ["s1"], result
        assert (state_dir / "state.json").read_bytes() == saved
        assert not [p.name for p in state_dir.iterdir() if p.name not in ("state.json", "filler")]
        expect_stack(daemon, ["s1"], trees)
        (state_dir / "filler").unlink()
        result = daemon.request({"action": "attach", "personality": "s2"})
        assert result["status"] == "ok", result
        assert [e["name"] for e in state_of(daemon)["desired"]] == ["s1", "s2"]
        expect_stack(daemon, ["s1", "s2"], trees)
    finally:
        daemon.stop()
        time.sleep(0.1)
        _umount(str(state_dir))
