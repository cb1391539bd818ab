"""Masks (docs/journal.md): whiteouts and opaque directories that delete or hide base content,
on real volumes, read back from the journal, conflicts.json and the files of the stack."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sandbox_view import CONFLICT, MASK, SUMMARY, Images, ok, read

from testkit.daemon import Daemon
from testkit.images import OPAQUE, WHITEOUT
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.sandbox import BASE_CONF, BASE_TOOL_BYTES

# The journal may lag on a loaded machine: these are deadlines for a hang, not a measure.
JOURNAL_WAIT = 60


def masks_of(daemon: Daemon) -> list[dict[str, Any]]:
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    masks: list[dict[str, Any]] = report["masks"]
    return masks


def test_whiteouts_and_opaque_directories_are_reported_one_by_one(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    (sandbox_root / "usr/share/doc/base-readme").write_text("the base's doc\n")
    (sandbox_root / "usr/sbin/base-daemon").write_text("#!/bin/sh\n")
    loop_devices.attach(
        image(
            "masker",
            {
                "usr/bin/base-tool": WHITEOUT,  # deletes a base file
                "usr/bin/never-there": WHITEOUT,  # deletes nothing of the base: no mask
                "usr/share/doc": OPAQUE,  # hides a base directory
                "usr/share/doc/mine": "masker's doc\n",
                "usr/share/masker": OPAQUE,  # no such base directory: no mask
                "usr/share/masker/x": "x",
                "usr/sbin": OPAQUE,
                "etc/motd": WHITEOUT,
                "etc/base.conf": "masker's conf\n",  # an override, counted, not a mask
            },
        )
    )
    daemon.start()
    attached = ok(daemon.request({"action": "attach", "personality": "masker"}))
    generation = str(attached["generation"])

    # What the stack shows: the base's entries are gone or hidden.
    assert not os.path.lexists(sandbox_root / "usr/bin/base-tool")
    assert sorted(os.listdir(sandbox_root / "usr/share/doc")) == ["mine"]
    assert os.listdir(sandbox_root / "usr/sbin") == []
    assert not os.path.lexists(sandbox_root / "etc/motd")
    assert read(sandbox_root, "etc/base.conf") == b"masker's conf\n"

    expected = {
        "/etc/motd": ("/etc", "deleted"),
        "/usr/bin/base-tool": ("/usr", "deleted"),
        "/usr/sbin": ("/usr", "hidden"),
        "/usr/share/doc": ("/usr", "hidden"),
    }
    entries = journal.entries(
        MASK,
        min_count=4,
        timeout=JOURNAL_WAIT,
        PERSONALITY_GENERATION=generation,
        _PID=str(daemon.pid),
    )
    assert len(entries) == 4
    for entry in entries:
        path = entry["PERSONALITY_PATH"]
        assert (entry["PERSONALITY_HIERARCHY"], entry["PERSONALITY_MASK"]) == expected[path]
        assert entry["PERSONALITY_NAME"] == "masker"
        assert entry["PRIORITY"] == "5"
        verb = "deletes the base's entry" if expected[path][1] == "deleted" else "hides"
        assert entry["MESSAGE"].startswith(f"Mask on {path}: 'masker' {verb}")
    (summary,) = journal.entries(
        SUMMARY, timeout=JOURNAL_WAIT, PERSONALITY_GENERATION=generation, _PID=str(daemon.pid)
    )
    assert summary["PERSONALITY_MASKS"] == "4"
    assert summary["PERSONALITY_OVERRIDES"] == "1"
    assert summary["PERSONALITY_CONFLICTS"] == "0"
    assert "4 masks" in summary["MESSAGE"]
    assert masks_of(daemon) == [
        {"path": path, "hierarchy": h, "name": "masker", "mask": mask}
        for path, (h, mask) in sorted(expected.items())
    ]


def test_a_mask_that_a_higher_personality_covers_is_an_override_and_a_conflict(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(image("masker", {"usr/bin/base-tool": WHITEOUT}))
    loop_devices.attach(image("restorer", {"usr/bin/base-tool": b"#!/bin/sh\necho again\n"}))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "masker"}))
    assert masks_of(daemon) == [
        {"path": "/usr/bin/base-tool", "hierarchy": "/usr", "name": "masker", "mask": "deleted"}
    ]
    both = ok(daemon.request({"action": "attach", "personality": "restorer"}))
    generation = str(both["generation"])

    assert read(sandbox_root, "usr/bin/base-tool") == b"#!/bin/sh\necho again\n"
    assert masks_of(daemon) == []
    (conflict,) = journal.entries(
        CONFLICT, timeout=JOURNAL_WAIT, PERSONALITY_GENERATION=generation, _PID=str(daemon.pid)
    )
    assert conflict["PERSONALITY_PATH"] == "/usr/bin/base-tool"
    assert conflict["PERSONALITY_STACK"] == "restorer masker"
    (summary,) = journal.entries(
        SUMMARY, timeout=JOURNAL_WAIT, PERSONALITY_GENERATION=generation, _PID=str(daemon.pid)
    )
    assert (summary["PERSONALITY_MASKS"], summary["PERSONALITY_OVERRIDES"]) == ("0", "1")
    assert journal.entries(MASK, min_count=0, PERSONALITY_GENERATION=generation) == []

    ok(daemon.request({"action": "detach", "personality": "masker"}))
    ok(daemon.request({"action": "detach", "personality": "restorer"}))
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert masks_of(daemon) == []


def test_an_opaque_hierarchy_top_hides_nothing(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    """overlayfs ignores the opaque mark on a layer's root: the volume's own `etc/` is that
    root, so it hides no base file, is no mask, and touches no protected path."""
    (sandbox_root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    loop_devices.attach(image("optop", {"etc": OPAQUE, "etc/optop.conf": "o\n"}))
    daemon.start()
    attached = ok(daemon.request({"action": "attach", "personality": "optop"}))
    assert read(sandbox_root, "etc/optop.conf") == b"o\n"
    assert read(sandbox_root, "etc/base.conf") == BASE_CONF.encode()
    assert read(sandbox_root, "etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
    assert masks_of(daemon) == []
    (summary,) = journal.entries(
        SUMMARY,
        timeout=JOURNAL_WAIT,
        PERSONALITY_GENERATION=str(attached["generation"]),
        _PID=str(daemon.pid),
    )
    assert summary["PERSONALITY_MASKS"] == "0"
