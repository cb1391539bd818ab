"""Checks shared by the stress scenarios: what a user observes after faults and load.

- `expect_stack`: every file of the live personalities reads back byte-exact through the
  stacked root (the topmost live personality wins), base files too; exactly one overlay per
  stacked hierarchy; volume mounts exactly for the live personalities; no staging mounts; no
  overlay work dir but the current generation's.
- `spool_answers`: every request answered exactly once (one result, in done/ or failed/,
  the request itself moved beside it, nothing left in the spool).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from support import BASE_CONF, BASE_TOOL_BYTES, Daemon, mountinfo

Tree = Mapping[str, bytes]  # root-relative path -> content of a regular file


def state_of(daemon: Daemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.state_dir / "state.json").read_text())
    return data


def desired_of(daemon: Daemon) -> list[str]:
    return [e["name"] for e in state_of(daemon)["desired"]]


def results(spool: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Request stem -> [(dir, result)] over done/ and failed/."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for where in ("done", "failed"):
        for path in (spool / where).glob("*.result.json"):
            stem = path.name[: -len(".result.json")]
            found.setdefault(stem, []).append((where, json.loads(path.read_text())))
    return found


def wait_answered(spool: Path, stems: Iterable[str], timeout: float = 120) -> None:
    wanted = set(stems)
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - set(results(spool))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} requests unanswered, e.g. {sorted(missing)[:5]}")
        time.sleep(0.1)


def spool_answers(spool: Path, stems: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Assert each request was answered exactly once; return stem -> result."""
    found = results(spool)
    answers = {}
    for stem in stems:
        got = found.get(stem, [])
        assert len(got) == 1, f"request {stem} answered {len(got)} times: {got}"
        where, result = got[0]
        assert (result["status"] == "ok") == (where == "done"), (stem, where, result)
        assert not (spool / f"{stem}.json").exists(), f"{stem}.json still in the spool"
        answers[stem] = result
    leftovers = [p.name for p in spool.glob("*.json")]
    assert not leftovers, f"requests left in the spool: {leftovers[:10]}"
    return answers


def expected_view(live: Sequence[str], trees: Mapping[str, Tree]) -> dict[str, bytes]:
    """Path -> bytes as the stack must show them: later (upper) personalities win."""
    view: dict[str, bytes] = {}
    for name in live:  # bottom first
        view.update(trees[name])
    return view


def expect_stack(
    daemon: Daemon,
    live: Sequence[str],
    trees: Mapping[str, Tree],
    hierarchies: Sequence[str] = ("/usr", "/etc"),
    writable: bool = False,
) -> None:
    root = daemon.root
    view = expected_view(live, trees)
    for rel, content in view.items():
        got = (root / rel).read_bytes()
        assert got == content, f"{rel}: {got[:60]!r} != {content[:60]!r} (live {list(live)})"
    assert (root / "usr/bin/base-tool").read_bytes() == BASE_TOOL_BYTES
    assert (root / "etc/base.conf").read_text() == BASE_CONF
    # Files of personalities that are not live must not show (unless a live one has them).
    for name, tree in trees.items():
        if name in live:
            continue
        for rel in tree:
            if rel not in view and "extension-release" not in rel:
                assert not (root / rel).exists(), f"{rel} of non-live '{name}' still visible"
    table = mountinfo()
    prefix = str(root) + "/"
    ours = [m for m in table if m[0].startswith(prefix)]
    for h in hierarchies:
        target = str(root / h.lstrip("/"))
        overlays = [m for m in ours if m[0] == target and m[1] == "overlay"]
        provides = any(rel.startswith(h.lstrip("/") + "/") for n in live for rel in trees[n])
        expected = 1 if provides and live else 0
        assert len(overlays) <= max(expected, 1 if writable and live else 0), (h, overlays)
        if provides and live:
            assert len(overlays) == 1, f"{h}: overlays {overlays}"
    mount_root = str(daemon.mount_root) + "/"
    volumes = sorted(
        m[0][len(mount_root) :] for m in ours if m[0].startswith(mount_root) and m[1] != "overlay"
    )
    assert volumes == sorted(live), f"volume mounts {volumes} != live {sorted(live)}"
    staging = [m for m in ours if "/staging/" in m[0]]
    assert not staging, f"staging mounts left: {staging}"


def work_dirs(daemon: Daemon) -> dict[str, list[str]]:
    """Overlay work dirs on the writable volume, per hierarchy key."""
    work = daemon.runtime_dir / "writable" / "work"
    if not work.is_dir():
        return {}
    return {h.name: sorted(os.listdir(h)) for h in work.iterdir() if h.is_dir()}


def expect_clean_work_dirs(daemon: Daemon) -> None:
    generation = state_of(daemon)["generation"]
    for h, entries in work_dirs(daemon).items():
        assert entries in ([], [str(generation)]), f"work/{h}: {entries} (generation {generation})"


def files_of(
    name: str, count: int, *, shared: Sequence[str] = (), etc: bool = True
) -> dict[str, bytes]:
    """A personality's regular files: its own, the `shared` (conflicting) ones, an /etc file."""
    tree = {f"usr/share/{name}/f{i:03d}": f"{name} file {i}\n".encode() for i in range(count)}
    for rel in shared:
        tree[rel] = f"{name} owns {rel}\n".encode()
    if etc:
        tree[f"etc/{name}.conf"] = f"conf of {name}\n".encode()
    return tree


def process_alive(daemon: Daemon) -> bool:
    return daemon.running()
