"""Stacks end to end: what attach, detach, switch and conflicts show through the sandbox root.

Everything is observed from outside the daemon: files through the sandbox root, mountinfo,
journal entries read back with journalctl, and spool result files.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox_view import (
    CONFLICT,
    FAILED,
    SUMMARY,
    Images,
    ok,
    our_mounts,
    read,
    stacked_overlays,
    wait_until,
)

from testkit.daemon import Daemon
from testkit.journal import JournalReader, field_list
from testkit.loops import LoopDevices
from testkit.sandbox import BASE_CONF, BASE_TOOL_BYTES


def test_attach_shows_files_and_mounts_volume_read_only(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("web", {"usr/sbin/nginx": b"nginx v1\n", "etc/nginx.conf": "x"}))
    daemon.start()

    result = ok(daemon.request({"action": "attach", "personality": "web", "id": "r-1"}))

    assert result["id"] == "r-1"
    assert result["changed"] is True
    assert result["attached"] == ["web"]
    assert read(sandbox_root, "usr/sbin/nginx") == b"nginx v1\n"
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert read(sandbox_root, "etc/base.conf") == BASE_CONF.encode()
    volume = sandbox_root / "opt/personality/web"
    assert (volume / "usr/sbin/nginx").read_bytes() == b"nginx v1\n"
    with pytest.raises(OSError) as exc:
        (volume / "usr/sbin/new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    options = subprocess.run(
        ["findmnt", "-n", "-o", "OPTIONS", str(volume)], capture_output=True, text=True, check=True
    ).stdout
    assert {"ro", "nodev", "nosuid"} <= set(options.strip().split(","))
    again = ok(daemon.request({"action": "attach", "personality": "web"}))
    assert again["changed"] is False


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "ext4"])
def test_each_filesystem_type_is_stacked(
    fmt: str, daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    label = "personality-fs" if fmt == "ext4" else None
    loop_devices.attach(image("fs", {"usr/bin/fs-tool": fmt}, fmt, label=label))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "fs"}))
    assert read(sandbox_root, "usr/bin/fs-tool") == fmt.encode()


def test_last_attached_wins_and_conflict_is_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    shared = {"usr/share/doc/README": b"same bytes\n"}
    loop_devices.attach(image("datasci", {"usr/bin/tool": b"datasci\n", **shared}))
    loop_devices.attach(image("webs", {"usr/bin/tool": b"webs\n", **shared}, "erofs"))
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "datasci"}))
    result = ok(daemon.request({"action": "attach", "personality": "webs"}))

    assert read(sandbox_root, "usr/bin/tool") == b"webs\n"
    generation = result["generation"]
    entries = journal.entries(
        CONFLICT, min_count=2, PERSONALITY_GENERATION=str(generation), _PID=str(daemon.pid)
    )
    by_path = {e["PERSONALITY_PATH"]: e for e in entries}
    tool = by_path["/usr/bin/tool"]
    assert tool["PERSONALITY_WINNER"] == "webs"
    assert field_list(tool, "PERSONALITY_SHADOWED") == ["datasci"]
    assert tool["PERSONALITY_IDENTICAL"] == "0"
    assert tool["PERSONALITY_HIERARCHY"] == "/usr"
    assert tool["PRIORITY"] == "4"
    assert tool["MESSAGE"].startswith("Conflict on /usr/bin/tool: 'webs' (attached last) shadows")
    assert by_path["/usr/share/doc/README"]["PERSONALITY_IDENTICAL"] == "1"
    summary = journal.entries(
        SUMMARY, PERSONALITY_GENERATION=str(generation), _PID=str(daemon.pid)
    )[0]
    assert summary["PERSONALITY_ATTACHED"] == "datasci webs"
    assert summary["PERSONALITY_CONFLICTS"] == "2"
    assert summary["PRIORITY"] == "5"
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert report["generation"] == generation
    assert {c["path"] for c in report["conflicts"]} == {"/usr/bin/tool", "/usr/share/doc/README"}


def test_detach_restores_base_and_switch_is_one_generation(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("one", {"usr/bin/base-tool": b"override\n", "usr/bin/one": "1"}))
    loop_devices.attach(image("two", {"usr/bin/two": "2"}))
    loop_devices.attach(image("three", {"usr/bin/three": "3"}))
    daemon.start()
    before = our_mounts(sandbox_root)

    first = ok(daemon.request({"action": "attach", "personality": "one"}))
    assert read(sandbox_root, "usr/bin/base-tool") == b"override\n"
    switched = ok(daemon.request({"action": "switch", "personalities": ["two", "three"]}))
    assert switched["generation"] == first["generation"] + 1
    assert switched["attached"] == ["two", "three"]
    assert not (sandbox_root / "usr/bin/one").exists()
    assert read(sandbox_root, "usr/bin/three") == b"3"
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES

    ok(daemon.request({"action": "detach", "personality": "two"}))
    ok(daemon.request({"action": "detach", "personality": "three"}))
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert not (sandbox_root / "usr/bin/three").exists()
    assert stacked_overlays(sandbox_root, "/usr") == []
    # Only the drained volume mounts are gone; what remains is what was there before.
    deadline = time.monotonic() + 120
    while our_mounts(sandbox_root) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert our_mounts(sandbox_root) == before
    gone = ok(daemon.request({"action": "detach", "personality": "two"}))
    assert gone["changed"] is False


# Reads PATH until STOP exists; appends to SEEN each change of what it reads, as it happens;
# prints its count of reads and of errors (a failed read, or content not in EXPECTED).
READER = r"""
import os, sys
path, expected, stop, seen = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
errors = reads = 0
last = None
with open(seen, "w") as out:
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read().decode()
        except OSError as exc:
            data = f"error: {exc}"
        if data not in expected:
            errors += 1
        reads += 1
        if data != last:
            out.write(data + "\n")
            out.flush()
            last = data
print(reads, errors)
"""


def test_readers_never_see_a_missing_file_during_switches(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path, tmp_path: Path
) -> None:
    loop_devices.attach(image("blue", {"usr/bin/shared": "blue"}))
    loop_devices.attach(image("green", {"usr/bin/shared": "green"}))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "blue"}))
    stop = tmp_path / "stop-reader"
    seen = tmp_path / "reader-saw"
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            READER,
            str(sandbox_root / "usr/bin/shared"),
            "blue,green",
            str(stop),
            str(seen),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    def reader_saw(content: str) -> Callable[[], bool]:
        def saw() -> bool:
            lines = seen.read_text().splitlines() if seen.exists() else []
            return bool(lines) and lines[-1] == content

        return saw

    try:
        # Reading before the first switch, and the content of each switch read before the
        # next one: the reads went on across every change of the stack.
        wait_until(reader_saw("blue"), daemon)
        for i in range(50):
            colour = "green" if i % 2 == 0 else "blue"
            ok(daemon.request({"action": "switch", "personalities": [colour]}))
            wait_until(reader_saw(colour), daemon)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    reads, errors = map(int, out.split())
    assert errors == 0, f"{errors} of {reads} reads failed or saw other content: {seen.read_text()}"


def test_failed_switch_rolls_back_and_is_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(image("stable", {"usr/bin/tool": b"stable\n"}))
    loop_devices.attach(image("good", {"usr/bin/good": b"good\n"}))
    broken_image = image("broken", {"usr/bin/tool": b"broken\n"})
    broken = loop_devices.attach(broken_image)
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "stable"}))
    before = our_mounts(sandbox_root)

    # The volume was recognised; now its medium goes bad before it is mounted for real.
    with open(broken_image, "r+b") as f:
        f.write(b"\0" * 4096)
    subprocess.run(["blockdev", "--flushbufs", broken], check=True)
    result = daemon.request({"action": "switch", "personalities": ["good", "broken"]})

    assert (result["_dir"], result["code"]) == ("failed", "mount-failed")
    assert "broken" in result["message"]
    assert result["attached"] == ["stable"]
    assert read(sandbox_root, "usr/bin/tool") == b"stable\n"
    assert not (sandbox_root / "usr/bin/good").exists()
    assert our_mounts(sandbox_root) == before
    failure = journal.entries(FAILED, _PID=str(daemon.pid))[0]
    assert "broken" in failure["PERSONALITY_REASON"]
    assert "switch" in failure["PERSONALITY_REQUESTED"]
    assert failure["PRIORITY"] == "3"
    # The daemon keeps serving.
    ok(daemon.request({"action": "attach", "personality": "good"}))
    assert read(sandbox_root, "usr/bin/good") == b"good\n"


@pytest.mark.parametrize(
    "settings",
    [{"overlay_api": "legacy"}, {"swap": "replace"}, {"overlay_api": "legacy", "swap": "replace"}],
)
def test_fallback_mount_paths_work(
    settings: dict[str, str],
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("fa", {"usr/bin/tool": "fa"}))
    loop_devices.attach(image("fb", {"usr/bin/tool": "fb"}))
    daemon.update_config({"stack": settings})
    daemon.start()
    log = daemon.log_text()
    assert "mount_fallback" in log
    ok(daemon.request({"action": "attach", "personality": "fa"}))
    ok(daemon.request({"action": "attach", "personality": "fb"}))
    assert read(sandbox_root, "usr/bin/tool") == b"fb"
    ok(daemon.request({"action": "switch", "personalities": ["fb", "fa"]}))
    assert read(sandbox_root, "usr/bin/tool") == b"fa"
    assert len(stacked_overlays(sandbox_root, "/usr")) == 1
    daemon.restart()
    assert read(sandbox_root, "usr/bin/tool") == b"fa"
    assert len(stacked_overlays(sandbox_root, "/usr")) == 1


def test_conflict_entries_are_capped_at_1000_and_summary_counts_the_rest(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, journal: JournalReader
) -> None:
    many = {f"usr/share/many/f{i:04}": f"{i}" for i in range(1050)}
    loop_devices.attach(image("many-a", many))
    loop_devices.attach(image("many-b", {k: v + "b" for k, v in many.items()}))
    daemon.start()
    result = ok(daemon.request({"action": "switch", "personalities": ["many-a", "many-b"]}))
    generation = str(result["generation"])
    summary = journal.entries(SUMMARY, _PID=str(daemon.pid), PERSONALITY_GENERATION=generation)
    assert summary[0]["PERSONALITY_CONFLICTS"] == "1050"
    assert "50 not logged singly" in summary[0]["MESSAGE"]
    singles = journal.entries(
        CONFLICT, min_count=1000, _PID=str(daemon.pid), PERSONALITY_GENERATION=generation
    )
    assert len(singles) == 1000
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert len(report["conflicts"]) == 1050  # the file has them all
