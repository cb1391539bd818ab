"""The upper, end to end: always stacked when there is one, and orphans moved aside on detach.

- With a writable volume (or the tmpfs fallback) every hierarchy is stacked, also with nothing
  attached, so a write lands in one place and shows in every generation: through attach,
  detach, re-attach, a daemon restart, and (on the volume) a reboot.
- Without an upper, a hierarchy no personality provides is the plain base.
- On detach, what the upper holds under directories that only the leaving personality
  provided is moved to `orphans/<generation>/<key>/<path>` on the writable volume, with one
  journal entry per path; the stacked view shows nothing of it afterwards.

Observed from outside: files through the sandbox root, mountinfo, the writable volume's own
mount, spool results, state.json and conflicts.json, the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from sandbox_view import Images, ok, read, stacked_overlays, state_generation, wait_until

from testkit.daemon import Daemon
from testkit.images import build_writable_image
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.mounts import mounts_under, unmount_tree
from testkit.sandbox import BASE_CONF

ORPHAN = "ff355680e36e48609dc2bf9664415a79"

IN_USR = "lib/python3/dist-packages"
DIST = f"usr/{IN_USR}"
NUMPY = {
    f"{DIST}/numpy/__init__.py": "# numpy\n",
    f"{DIST}/numpy/core/multiarray.py": "# core\n",
    "etc/numpy/site.cfg": "[numpy]\n",
}
SCIPY = {f"{DIST}/scipy/__init__.py": "# scipy\n"}
WEB = {"usr/sbin/nginx": b"nginx\n", "etc/nginx/nginx.conf": "worker_processes 1;\n"}


def _stacked(root: Path) -> dict[str, int]:
    return {h: len(stacked_overlays(root, h)) for h in ("/usr", "/etc")}


def _face(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _reboot(daemon: Daemon, root: Path) -> None:
    """What a reboot does to the sandbox: the daemon stops, every mount is gone (the stack,
    the volumes, the writable volume's mount), /run starts empty; the devices stay."""
    daemon.stop()
    unmount_tree(root)
    assert not mounts_under(root)
    shutil.rmtree(daemon.runtime_dir)  # nothing is mounted below it (checked above)
    daemon.start()


@pytest.mark.parametrize("upper", ["volume", "tmpfs"])
def test_a_write_to_etc_with_nothing_attached_stays_through_every_change(
    upper: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    loop_devices.attach(image("web", WEB))
    if upper == "volume":
        loop_devices.attach(build_writable_image(tmp_path), read_only=False)
        where = daemon.runtime_dir / "writable"
    else:
        daemon.update_config({"writable": {"fallback": "tmpfs"}})
        where = daemon.runtime_dir / "volatile"
    etc = sandbox_root / "etc"
    os.chown(etc, 0, 100)
    os.chmod(etc, 0o751)  # not what a new upper directory gets
    face = _face(etc)
    daemon.start()
    # Stacked from the start, with nothing attached: the upper over the base, with its face.
    assert _stacked(sandbox_root) == {"/usr": 1, "/etc": 1}
    assert _face(etc) == face
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["desired"] == []
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert (report["attached"], report["conflicts"]) == ([], [])
    record = json.loads((daemon.runtime_dir / "stack.json").read_text())
    assert record["hierarchies"]["/etc"]["layers"] == [str(daemon.runtime_dir / "base/_etc")]

    (sandbox_root / "etc/admin.conf").write_text("mine\n")
    (sandbox_root / "etc/base.conf").write_text("edited\n")
    assert (where / "upper/_etc/admin.conf").read_text() == "mine\n"

    def written(when: str) -> None:
        assert read(sandbox_root, "etc/admin.conf") == b"mine\n", when
        assert read(sandbox_root, "etc/base.conf") == b"edited\n", when

    result = ok(daemon.request({"action": "attach", "personality": "web"}))
    assert result["attached"] == ["web"]
    written("after attach")
    assert read(sandbox_root, "etc/nginx/nginx.conf") == b"worker_processes 1;\n"
    result = ok(daemon.request({"action": "detach", "personality": "web"}))
    assert (result["changed"], result["attached"]) == (True, [])
    written("after detach")
    assert not (sandbox_root / "etc/nginx").exists()
    assert _stacked(sandbox_root) == {"/usr": 1, "/etc": 1}  # the last detach keeps the upper
    ok(daemon.request({"action": "attach", "personality": "web"}))
    written("after re-attach")
    generation = state_generation(daemon)
    daemon.restart()
    written("after a restart")
    assert state_generation(daemon) == generation  # adopted as it was, not rebuilt
    assert _stacked(sandbox_root) == {"/usr": 1, "/etc": 1}
    ok(daemon.request({"action": "detach", "personality": "web"}))
    daemon.restart()
    written("after a restart with nothing attached")
    # The base itself never changed.
    assert (daemon.runtime_dir / "base/_etc/base.conf").read_text() == BASE_CONF
    assert _face(etc) == face
    if upper == "volume":
        _reboot(daemon, sandbox_root)
        written("after a reboot")
        assert _stacked(sandbox_root) == {"/usr": 1, "/etc": 1}
        assert _face(etc) == face


def test_without_an_upper_a_hierarchy_nobody_provides_stays_the_base(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("tools", {"usr/bin/tool": b"tool\n"}))
    daemon.start()
    assert _stacked(sandbox_root) == {"/usr": 0, "/etc": 0}
    ok(daemon.request({"action": "attach", "personality": "tools"}))
    assert _stacked(sandbox_root) == {"/usr": 1, "/etc": 0}
    ok(daemon.request({"action": "detach", "personality": "tools"}))
    assert _stacked(sandbox_root) == {"/usr": 0, "/etc": 0}


def _pyc(root: Path, package: str) -> Path:
    cache = root / DIST / package / "__pycache__"
    cache.mkdir()
    pyc = cache / "__init__.cpython-311.pyc"
    pyc.write_bytes(b"compiled " + package.encode())
    return pyc


def test_writes_under_a_detached_personality_are_moved_aside_and_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(image("numpy", NUMPY))
    loop_devices.attach(image("scipy", SCIPY))
    loop_devices.attach(build_writable_image(tmp_path), read_only=False)
    daemon.start()
    ok(daemon.request({"action": "switch", "personalities": ["scipy", "numpy"]}))
    _pyc(sandbox_root, "numpy")
    _pyc(sandbox_root, "scipy")
    (sandbox_root / "etc/numpy/local.cfg").write_text("admin's numpy setting\n")
    (sandbox_root / DIST / "admin.pth").write_text("/opt/admin\n")  # shared with scipy
    (sandbox_root / "usr/share/doc/admin-note").write_text("in a base directory\n")
    (sandbox_root / "etc/admin.conf").write_text("in the base's /etc\n")
    volume = daemon.runtime_dir / "writable"
    assert (volume / "upper/_usr" / IN_USR / "numpy/__pycache__").is_dir()

    ok(daemon.request({"action": "detach", "personality": "numpy"}))

    generation = state_generation(daemon)
    # Nothing of numpy shows: no namespace package made of the upper alone.
    assert not (sandbox_root / DIST / "numpy").exists()
    assert not (sandbox_root / "etc/numpy").exists()
    # What the administrator wrote where it stays is kept in place.
    assert read(sandbox_root, f"{DIST}/admin.pth") == b"/opt/admin\n"
    assert read(sandbox_root, "usr/share/doc/admin-note") == b"in a base directory\n"
    assert read(sandbox_root, "etc/admin.conf") == b"in the base's /etc\n"
    assert read(sandbox_root, f"{DIST}/scipy/__pycache__/__init__.cpython-311.pyc") == (
        b"compiled scipy"
    )
    # The writes are on the writable volume, under orphans/<generation>/<key>/<path>.
    moved = volume / "orphans" / str(generation)
    pyc = moved / "_usr" / IN_USR / "numpy/__pycache__/__init__.cpython-311.pyc"
    assert pyc.read_bytes() == b"compiled numpy"
    assert (moved / "_etc/numpy/local.cfg").read_text() == "admin's numpy setting\n"
    assert not (volume / "upper/_usr" / IN_USR / "numpy").exists()
    assert not (volume / "upper/_etc/numpy").exists()
    pid = daemon.pid
    assert pid is not None
    entries = journal.entries(ORPHAN, min_count=2, PERSONALITY_GENERATION=generation, _PID=pid)
    by_path = {e["PERSONALITY_PATH"]: e for e in entries}
    assert sorted(by_path) == ["/etc/numpy", f"/{DIST}/numpy"]
    entry = by_path[f"/{DIST}/numpy"]
    assert entry["PERSONALITY_NAME"] == "numpy"
    assert entry["PRIORITY"] == "5"
    assert entry["PERSONALITY_ORPHAN"] == f"orphans/{generation}/_usr/{IN_USR}/numpy"
    assert "numpy" in entry["MESSAGE"] and entry["PERSONALITY_ORPHAN"] in entry["MESSAGE"]

    # Attached again, numpy shows its own files, not the writes moved aside.
    ok(daemon.request({"action": "attach", "personality": "numpy"}))
    assert read(sandbox_root, f"{DIST}/numpy/__init__.py") == b"# numpy\n"
    assert not (sandbox_root / DIST / "numpy/__pycache__").exists()
    assert not (sandbox_root / "etc/numpy/local.cfg").exists()
    # After a restart (the stack adopted as it was), a detach moves new writes aside too; the
    # daemon never deletes what it moved before.
    daemon.restart()
    _pyc(sandbox_root, "numpy").write_bytes(b"compiled again")
    ok(daemon.request({"action": "detach", "personality": "numpy"}))
    assert not (sandbox_root / DIST / "numpy").exists()
    again = volume / "orphans" / str(state_generation(daemon)) / "_usr" / IN_USR
    assert (again / "numpy/__pycache__/__init__.cpython-311.pyc").read_bytes() == b"compiled again"
    assert pyc.read_bytes() == b"compiled numpy"
    # The conflicts report means what it meant: scipy alone has none.
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert (report["attached"], report["conflicts"]) == (["scipy"], [])


def test_a_yanked_volume_leaves_no_orphans_in_view(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    """A volume that goes away is left out of the stack like a detach (it stays desired): its
    directories with writes are moved aside too, from the index kept of the live stack."""
    numpy = loop_devices.attach(image("numpy", NUMPY))
    daemon.update_config({"writable": {"fallback": "tmpfs"}})
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "numpy"}))
    _pyc(sandbox_root, "numpy")

    loop_devices.yank(numpy)

    wait_until(lambda: not (sandbox_root / DIST / "numpy").exists(), daemon)
    assert not (sandbox_root / "usr/lib/python3").exists()  # the base has no python3
    moved = daemon.runtime_dir / "volatile/orphans" / str(state_generation(daemon))
    pyc = moved / "_usr/lib/python3/dist-packages/numpy/__pycache__/__init__.cpython-311.pyc"
    assert pyc.read_bytes() == b"compiled numpy"
    assert daemon.pid is not None
    entries = journal.entries(ORPHAN, PERSONALITY_NAME="numpy", _PID=daemon.pid)
    assert [e["PERSONALITY_PATH"] for e in entries] == ["/usr/lib/python3"]


def test_the_writable_volume_appearing_and_going_away_with_nothing_attached(
    daemon: Daemon, loop_devices: LoopDevices, sandbox_root: Path, tmp_path: Path
) -> None:
    """No upper at start: the base. The writable volume arrives: stacked, writes land there.
    It goes away: the base again (read-only stack, nothing to stack). Back: the writes too."""
    daemon.start()
    assert _stacked(sandbox_root) == {"/usr": 0, "/etc": 0}
    writable_image = build_writable_image(tmp_path)
    writable = loop_devices.attach(writable_image, read_only=False)
    wait_until(lambda: _stacked(sandbox_root) == {"/usr": 1, "/etc": 1}, daemon)
    (sandbox_root / "etc/admin.conf").write_text("on the volume\n")

    loop_devices.yank(writable)
    wait_until(lambda: _stacked(sandbox_root) == {"/usr": 0, "/etc": 0}, daemon)
    assert not (sandbox_root / "etc/admin.conf").exists()
    assert read(sandbox_root, "etc/base.conf") == BASE_CONF.encode()

    loop_devices.attach(writable_image, read_only=False)
    wait_until(lambda: (sandbox_root / "etc/admin.conf").exists(), daemon)
    assert read(sandbox_root, "etc/admin.conf") == b"on the volume\n"


def test_an_orphan_that_cannot_be_moved_stays_in_place_and_the_detach_goes_on(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    """`orphans` on the volume is a file (a stray one, or a full volume would fail the same
    way): the move fails, the writes stay where they were, visible, and the log says so."""
    loop_devices.attach(image("numpy", NUMPY))
    daemon.update_config({"writable": {"fallback": "tmpfs"}})
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "numpy"}))
    pyc = _pyc(sandbox_root, "numpy")
    (daemon.runtime_dir / "volatile/orphans").write_text("in the way\n")

    result = ok(daemon.request({"action": "detach", "personality": "numpy"}))

    assert result["attached"] == []
    assert pyc.read_bytes() == b"compiled numpy"  # kept in place, in the upper and in view
    assert not (sandbox_root / DIST / "numpy/__init__.py").exists()
    log = daemon.log_text()
    assert "event=orphan_not_moved path=/usr/lib/python3" in log, log[-3000:]
    assert daemon.pid is not None
    assert journal.entries(ORPHAN, min_count=0, timeout=2, _PID=daemon.pid) == []
