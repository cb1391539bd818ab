"""What a user observes of a stack, checked after faults and load (the stress scenarios).

`expect_stack`: every file of the live personalities reads back byte-exact through the
stacked root (the topmost live personality wins), base files too; exactly one overlay per
stacked hierarchy; volume mounts exactly for the live personalities; no staging mounts.
`expect_clean_work_dirs`: no overlay work dir but the current generation's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testkit.daemon import Daemon
from testkit.mounts import mountinfo
from testkit.sandbox import BASE_CONF, BASE_TOOL_BYTES

Tree = Mapping[str, bytes]  # root-relative path -> content of a regular file


def state_of(daemon: Daemon) -> dict[str, Any]:
    """The daemon's state file, parsed."""
    data: dict[str, Any] = json.loads((daemon.state_dir / "state.json").read_text())
    return data


def desired_of(daemon: Daemon) -> list[str]:
    """The desired list in the daemon's state file."""
    return [e["name"] for e in state_of(daemon)["desired"]]


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


def expected_view(live: Sequence[str], trees: Mapping[str, Tree]) -> dict[str, bytes]:
    """Path -> bytes as the stack must show them: later (upper) personalities win."""
    view: dict[str, bytes] = {}
    for name in live:  # bottom first
        view.update(trees[name])
    return view


def _expect_files(root: Path, live: Sequence[str], trees: Mapping[str, Tree]) -> None:
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


def _expect_overlays(
    ours: Sequence[tuple[str, str, str]],
    root: Path,
    live: Sequence[str],
    trees: Mapping[str, Tree],
    hierarchies: Sequence[str],
    writable: bool,
) -> None:
    for h in hierarchies:
        target = str(root / h.lstrip("/"))
        overlays = [m for m in ours if m[0] == target and m[1] == "overlay"]
        provides = any(rel.startswith(h.lstrip("/") + "/") for n in live for rel in trees[n])
        # With an upper every hierarchy is stacked, with or without personalities.
        expected = 1 if writable or (provides and live) else 0
        assert len(overlays) == expected, f"{h}: overlays {overlays}"


def expect_stack(
    daemon: Daemon,
    live: Sequence[str],
    trees: Mapping[str, Tree],
    hierarchies: Sequence[str] = ("/usr", "/etc"),
    writable: bool = False,
) -> None:
    """The stack of `live` (bottom first) is what a user sees: files, overlays, volume mounts."""
    root = daemon.root
    _expect_files(root, live, trees)
    prefix = str(root) + "/"
    ours = [m for m in mountinfo() if m[0].startswith(prefix)]
    _expect_overlays(ours, root, live, trees, hierarchies, writable)
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
    """Only the current generation's work dir (or none) under each hierarchy's work/."""
    generation = state_of(daemon)["generation"]
    for h, entries in work_dirs(daemon).items():
        assert entries in ([], [str(generation)]), f"work/{h}: {entries} (generation {generation})"
