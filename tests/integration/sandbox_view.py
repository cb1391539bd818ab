"""What the daemon's work looks like from outside, for the integration tests of the stack:
files read through the sandbox root, our mounts in mountinfo, a request that succeeded, the
generation in state.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testkit.daemon import Daemon
from testkit.mounts import mountinfo

# Journal MESSAGE_IDs (docs/journal.md).
CONFLICT = "3e47b2d0af514d77b3126415a1549afb"
SUMMARY = "745778a2970b4475acba70df8299437b"
REFUSED = "18d0afe90a164b398024e69871a6bc44"
FAILED = "091e1791abd44213b5aa028ad69c8fce"
MASK = "727c1463be574032988019655f1f0294"

# `image(name, files, fmt="squashfs", **kw)`, the fixture in conftest.py.
Images = Callable[..., Path]


def read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["status"] == "ok", result
    assert result["_dir"] == "done"
    return result


def state_generation(daemon: Daemon) -> int:
    """The generation the daemon last wrote to its state.json."""
    data = json.loads((daemon.state_dir / "state.json").read_text())
    return int(data["generation"])


def our_mounts(root: Path) -> list[tuple[str, str, str]]:
    prefix = str(root) + "/"
    return sorted(m for m in mountinfo() if m[0].startswith(prefix))


def stacked_overlays(root: Path, hierarchy: str) -> list[tuple[str, str, str]]:
    target = str(root / hierarchy.lstrip("/"))
    return [m for m in mountinfo() if m[0] == target and m[1] == "overlay"]


def wait_until(condition: Callable[[], bool], daemon: Daemon, timeout: float = 120) -> None:
    """Poll `condition` until true; after `timeout` fail with the end of the daemon's log."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, daemon.log_text()[-4000:]
        time.sleep(0.1)
