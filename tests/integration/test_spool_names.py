"""Spool request names up to the longest a file may have: every request is answered once, and
one whose result name would not fit is refused under a shortened name, never run again."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sandbox_view import Images, read, wait_until

from testkit.daemon import Daemon
from testkit.loops import LoopDevices

# `.<stem>.result.json.XXXXXXXX.tmp` must fit in 255 bytes: see docs/spool.md.
LONGEST_STEM = 255 - len(".") - len(".XXXXXXXX.tmp") - len(".result.json")


def rename_in(spool: Path, stem: str, body: dict[str, Any]) -> None:
    temporary = spool / ".long-name.tmp"  # the documented dotfile, short enough to exist
    temporary.write_text(json.dumps(body))
    os.rename(temporary, spool / f"{stem}.json")


def filed(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def test_the_longest_stem_runs_and_a_longer_one_is_refused_once_under_a_short_name(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("web", {"usr/bin/web": b"web\n"}))
    loop_devices.attach(image("tools", {"usr/bin/tools": b"tools\n"}))
    daemon.start()
    spool = daemon.spool_dir

    longest = "a" * LONGEST_STEM
    rename_in(spool, longest, {"action": "attach", "personality": "web", "id": "longest"})
    wait_until(lambda: (spool / f"done/{longest}.result.json").exists(), daemon)
    assert json.loads((spool / f"done/{longest}.result.json").read_text())["status"] == "ok"
    assert (spool / f"done/{longest}.json").exists()

    too_long = "é" * 125  # 250 bytes in UTF-8: the request fits, its result would not
    rename_in(spool, too_long, {"action": "switch", "personalities": ["tools"]})
    wait_until(lambda: any(n.endswith(".result.json") for n in filed(spool / "failed")), daemon)
    [result_name] = [n for n in filed(spool / "failed") if n.endswith(".result.json")]
    assert len(result_name.encode()) <= 255 and result_name.startswith("é")
    result = json.loads((spool / "failed" / result_name).read_text())
    assert (result["status"], result["code"]) == ("error", "invalid-request")
    assert "name shortened" in result["message"], result
    assert result["attached"] == ["web"]
    assert (spool / "failed" / result_name.replace(".result.json", ".json")).exists()
    assert not (spool / f"{too_long}.json").exists()
    assert read(sandbox_root, "usr/bin/web") == b"web\n"

    # The administrator's later change is not undone by the refused request at a restart.
    detach = daemon.request({"action": "detach", "personality": "web"})
    assert detach["status"] == "ok", detach
    daemon.stop()
    daemon.start()
    # Requests found at start run first: had the refused switch to tools run again, it would
    # be under web now.
    answered = daemon.request({"action": "attach", "personality": "web"})
    assert answered["attached"] == ["web"], answered
    assert [n for n in filed(spool / "failed") if n.endswith(".result.json")] == [result_name]
