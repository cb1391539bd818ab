"""Generated stacks: hypothesis builds 2 or 3 volumes of files, directories, symlinks,
whiteouts and opaque directories over a fixed base, the daemon stacks them for real, and what
a user sees is held against the rule of docs (overlayfs lookup; conflicts as section 5 of the
design has them), written out here on its own:

- through the stack, every path shows what the topmost layer that reaches it has (a file's
  bytes, a symlink's target, a merged directory); a whiteout deletes, an opaque directory
  hides everything below it in lower layers, a non-directory under a directory ends the merge;
- the conflicts the daemon reports (conflicts.json) are exactly the paths that two or more
  personalities provide where at least one entry is not a plain directory, with the winner
  and the shadowed top first, and `identical` when all are files with equal bytes or all
  symlinks with equal targets.

`STRESS_STACK_EXAMPLES` (default 25) examples, one daemon for all of them.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.daemon import Daemon
from testkit.images import OPAQUE, WHITEOUT, FileSpec, build_image, write_tree
from testkit.loops import LoopDevices

TOP = "usr/share/gen"  # where the generated trees live, in the base and in every volume


@dataclass(frozen=True)
class File:
    content: bytes


@dataclass(frozen=True)
class Link:
    target: str


@dataclass(frozen=True)
class Whiteout:
    pass


@dataclass(frozen=True)
class Dir:
    children: dict[str, Node] = field(default_factory=dict)
    opaque: bool = False


Node = File | Link | Whiteout | Dir

BASE = Dir(
    {
        "a": File(b"base a\n"),
        "b": Dir({"a": File(b"base b/a\n"), "b": Dir({"c": File(b"base b/b/c\n")})}),
        "c": Link("base-target"),
        "d": Dir({"a": File(b"base d/a\n"), "c": Dir()}),
    }
)

NAMES = st.sampled_from(["a", "b", "c", "d"])
LEAVES: st.SearchStrategy[Node] = st.one_of(
    st.builds(File, st.sampled_from([b"x\n", b"y\n"])),
    st.builds(Link, st.sampled_from(["t1", "t2"])),
    st.just(Whiteout()),
)
NODES: st.SearchStrategy[Node] = st.recursive(
    LEAVES,
    lambda children: st.builds(
        Dir, st.dictionaries(NAMES, children, max_size=3), st.booleans()
    ),
    max_leaves=8,
)
VOLUME = st.builds(Dir, st.dictionaries(NAMES, NODES, min_size=1, max_size=4))
STACKS = st.lists(VOLUME, min_size=2, max_size=3)


def _specs(node: Dir, prefix: str) -> Iterator[tuple[str, FileSpec]]:
    """write_tree's specs for `node` at `prefix`, parents first."""
    for name, child in node.children.items():
        path = f"{prefix}/{name}"
        if isinstance(child, Dir):
            yield path, OPAQUE if child.opaque else ("dir",)
            yield from _specs(child, path)
        elif isinstance(child, File):
            yield path, child.content
        elif isinstance(child, Link):
            yield path, ("symlink", child.target)
        else:
            yield path, WHITEOUT


Layer = tuple[str | None, Dir]  # (personality, or None for the base; its directory here)
Conflicts = dict[str, tuple[str, tuple[str, ...], bool]]  # path -> winner, shadowed, identical
View = dict[str, bytes | str]  # path -> file bytes, "link:<target>" or "dir"


def expected(layers: list[Layer], prefix: str, view: View, conflicts: Conflicts) -> None:
    """Fill `view` and `conflicts` for the merged directory `prefix` that `layers` (top
    first) make up: the rule, path by path."""
    names = sorted({n for _, d in layers for n in d.children})
    for name in names:
        path = f"{prefix}/{name}"
        having = [(who, d.children[name]) for who, d in layers if name in d.children]
        personal = [(who, node) for who, node in having if who is not None]
        if len(personal) > 1 and any(
            not isinstance(node, Dir) or node.opaque for _, node in personal
        ):
            files = {n.content for _, n in personal if isinstance(n, File)}
            links = {n.target for _, n in personal if isinstance(n, Link)}
            kinds = {type(n) for _, n in personal}
            same = kinds in ({File}, {Link}) and len(files | links) == 1
            names_top_first = [str(who) for who, _ in personal]
            conflicts[path] = (names_top_first[0], tuple(names_top_first[1:]), same)
        top = having[0][1]
        if isinstance(top, Whiteout):
            continue
        if isinstance(top, File):
            view[path] = top.content
        elif isinstance(top, Link):
            view[path] = f"link:{top.target}"
        else:
            view[path] = "dir"
            merged: list[Layer] = []
            for who, node in having:
                if not isinstance(node, Dir):
                    break  # a non-directory below a directory ends the merge
                merged.append((who, node))
                if node.opaque:
                    break  # an opaque directory hides the layers below it
            expected(merged, path, view, conflicts)


def seen(root: Path, top: str) -> View:
    """What a user sees below `root`/`top`, walked without following links. A name that the
    listing shows but a lookup does not find is not there: overlayfs passes the listing of a
    directory that only one layer provides straight through, whiteouts included, while the
    lookup honours them."""
    view: View = {}
    stack = [top]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel) as entries:
            for entry in entries:
                path = f"{rel}/{entry.name}"
                try:
                    mode = os.lstat(entry.path).st_mode
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(mode):
                    view["/" + path] = f"link:{os.readlink(entry.path)}"
                elif stat.S_ISDIR(mode):
                    view["/" + path] = "dir"
                    stack.append(path)
                else:
                    view["/" + path] = Path(entry.path).read_bytes()
    return view


def test_generated_stacks_follow_the_rule(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, sandbox_root: Path
) -> None:
    write_tree(sandbox_root, dict(_specs(BASE, TOP)))
    daemon.start()
    counter = iter(range(10**6))
    tally = {"examples": 0, "conflicts": 0, "identical": 0, "paths": 0}

    @settings(
        max_examples=int(os.environ.get("STRESS_STACK_EXAMPLES", "25")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(STACKS)
    def one(volumes: list[Dir]) -> None:
        example = next(counter)
        names = [f"g{example}v{i}" for i in range(len(volumes))]  # bottom first
        devs = []
        try:
            for name, volume in zip(names, volumes, strict=True):
                image = build_image(tmp_path, name, dict(_specs(volume, TOP)))
                devs.append(loop_devices.attach(image))
            switch = {"action": "switch", "personalities": names, "timeout": 60}
            result = daemon.request(switch, timeout=120)  # (the daemon may not have seen them yet)
            assert result["status"] == "ok", result
            layers: list[Layer] = [
                (n, v) for n, v in reversed(list(zip(names, volumes, strict=True)))
            ]
            view: View = {}
            conflicts: Conflicts = {}
            expected([*layers, (None, BASE)], f"/{TOP}", view, conflicts)
            assert seen(sandbox_root, TOP) == view
            report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
            got = {
                c["path"]: (c["winner"], tuple(c["shadowed"]), c["identical"])
                for c in report["conflicts"]
                if c["path"].startswith(f"/{TOP}/")
            }
            assert got == conflicts
            tally["examples"] += 1
            tally["conflicts"] += len(conflicts)
            tally["identical"] += sum(same for _, _, same in conflicts.values())
            tally["paths"] += len(view)
        finally:
            cleared = daemon.request({"action": "switch", "personalities": []}, timeout=120)
            assert cleared["status"] == "ok", cleared
            for dev in devs:
                loop_devices.detach(dev)

    one()
    assert daemon.running()
    # Not vacuous: the examples had conflicts, identical ones among them, and content to see.
    assert tally["conflicts"] > 0 and tally["identical"] > 0 and tally["paths"] > 0, tally
    print(f"generated stacks: {tally}")
