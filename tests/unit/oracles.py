"""Reference implementations the tests check the daemon's fast ones against.

They spell out the rules path by path, with plain dicts: `find_conflicts` (overlayfs lookup
semantics, the rule the packed conflict finder of core/packed.py must give exactly),
`index_volume`/`index_tree` (the walk adapters/indexer.py does in packed form),
`pack`/`to_dict` between the two forms, and `base_names` (directory listings of a dict
base). The daemon never uses them.

Conflicts between stacked personalities, found with overlayfs lookup semantics.

Layers are given top first. Overlayfs resolves a path component by component: at each
directory A, the layers that reach A are consulted top first; a regular directory lets the
next layer's entry merge in, an opaque directory lets only its own layer contribute below A,
and a non-directory (file, symlink, whiteout, device, ...) hides A in every layer under it.
The layers that reach a path are therefore always the top ones, down to a limit index; the
base, below every layer, reaches a path only when nothing above it cut the way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from personalityd.adapters import indexer
from personalityd.adapters.indexer import FILE, SYMLINK, WHITEOUT
from personalityd.core.model import (
    DIR,
    MASK_DELETED,
    MASK_HIDDEN,
    OPAQUE_DIR,
    Conflict,
    Mask,
    TreeIndex,
)
from personalityd.core.packed import PackedTree, PackedTreeBuilder


def find_conflicts(
    hierarchy: str,
    layers: Sequence[tuple[str, TreeIndex]],
    base_kind: Callable[[str], str | None],
    identical: Callable[[str, Sequence[str]], bool],
) -> tuple[list[Conflict], int, list[Mask]]:
    """The conflicts in one hierarchy (sorted by path), how many base entries are overridden,
    and the masks (base entries deleted by a whiteout, base directories hidden by an opaque
    directory; sorted by path).

    `layers` are (personality name, index) top first. `base_kind(relpath)` says what the base
    has at a path (None: nothing); it is called only for paths the base is not cut off from
    where the topmost entry that does not merge is the top layer's, or a whiteout or an opaque
    directory. That entry decides: a whiteout deletes the base's entry, an opaque directory
    over a base directory hides it, anything else of the top layer overrides it.
    `identical(relpath, names_top_first)` is called only for conflicts whose entries are all
    regular files or all symlinks. Path by path, with no shortcut: slow, and plainly the rule.
    """
    n = len(layers)  # the index that stands for the base
    names = [name for name, _ in layers]
    trees = [tree for _, tree in layers]
    prefix = hierarchy.rstrip("/") + "/"
    conflicts: list[Conflict] = []
    masks: list[Mask] = []
    overrides = 0
    for path in sorted(set().union(*trees)):
        limit = _limit_below(trees, path.rpartition("/")[0])
        reaching = [k for k in range(min(limit + 1, n)) if path in trees[k]]
        if not reaching:
            continue
        kinds = [trees[k][path] for k in reaching]
        if len(reaching) > 1 and any(kind != DIR for kind in kinds):
            shown = tuple(names[k] for k in reaching)
            comparable = all(k == FILE for k in kinds) or all(k == SYMLINK for k in kinds)
            same = comparable and identical(path, shown)
            conflicts.append(Conflict(prefix + path, hierarchy, shown[0], shown[1:], same))
        first = next((j for j, kind in enumerate(kinds) if kind != DIR), None)
        if limit != n or first is None:
            continue
        kind = kinds[first]
        if first > 0 and kind not in (WHITEOUT, OPAQUE_DIR):
            continue
        base = base_kind(path)
        if base is None:
            continue
        if kind == WHITEOUT:
            masks.append(Mask(prefix + path, hierarchy, names[reaching[first]], MASK_DELETED))
        elif kind == OPAQUE_DIR and base in (DIR, OPAQUE_DIR):
            masks.append(Mask(prefix + path, hierarchy, names[reaching[first]], MASK_HIDDEN))
        elif first == 0:
            overrides += 1
    return conflicts, overrides, masks


def _limit_below(trees: Sequence[TreeIndex], directory: str) -> int:
    """The deepest layer (len(trees): the base too) that reaches the children of `directory`.

    Component by component, top first: a directory lets the next layer merge in; an opaque
    directory lets only its own layer through; anything else hides the path in every layer
    below it (and its own layer has nothing below a non-directory)."""
    limit = len(trees)
    parts = directory.split("/") if directory else []
    for depth in range(1, len(parts) + 1):
        ancestor = "/".join(parts[:depth])
        for k in range(min(limit + 1, len(trees))):
            kind = trees[k].get(ancestor)
            if kind is None or kind == DIR:
                continue
            limit = k if kind == OPAQUE_DIR else k - 1
            break
    return limit


def index_volume(mount_path: str, hierarchies: Sequence[str]) -> dict[str, dict[str, str]]:
    """Index each hierarchy (`/usr`) the volume mounted at `mount_path` provides.

    Returns hierarchy -> TreeIndex (relative path -> kind). A hierarchy the volume does not
    have as a real directory (missing, a file, or a symlink anywhere on the way) is absent
    from the result. An unreadable directory or an I/O error raises OSError naming the path.
    """
    result: dict[str, dict[str, str]] = {}
    for hierarchy in hierarchies:
        top = indexer._hierarchy_dir(mount_path, hierarchy)
        if top is not None:
            result[hierarchy] = index_tree(top)
    return result


def index_tree(top: str) -> dict[str, str]:
    """Index everything below the directory `top` (not `top` itself)."""
    index: dict[str, str] = {}
    # (absolute directory path, its relative path + "/" or "" for top, holds xattr whiteouts)
    stack: list[tuple[str, str, bool]] = [(top, "", indexer._dir_marks(top)[1])]
    # Local names: this loop runs once per entry of the volume.
    pop = stack.pop
    push = stack.append
    dir_marks = indexer._dir_marks
    other_kind = indexer._other_kind
    is_xattr_whiteout = indexer._is_xattr_whiteout
    while stack:
        dirpath, prefix, xwhiteouts = pop()
        try:
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    relpath = prefix + entry.name
                    # Regular files first: they are most entries, and d_type answers.
                    if entry.is_file(follow_symlinks=False):
                        if xwhiteouts and is_xattr_whiteout(entry):
                            index[relpath] = WHITEOUT
                        else:
                            index[relpath] = FILE
                    elif entry.is_dir(follow_symlinks=False):
                        opaque, child_xwhiteouts = dir_marks(entry.path)
                        index[relpath] = OPAQUE_DIR if opaque else DIR
                        push((entry.path, relpath + "/", child_xwhiteouts))
                    elif entry.is_symlink():
                        index[relpath] = SYMLINK
                    else:
                        index[relpath] = other_kind(entry.stat(follow_symlinks=False))
        except OSError as e:
            where = e.filename if isinstance(e.filename, str) else dirpath
            raise OSError(e.errno, e.strerror, where) from e
    return index


def pack(tree: Mapping[str, str]) -> PackedTree:
    """A PackedTree from a well-formed TreeIndex (tests, and indexes made the old way)."""
    children: dict[bytes, list[tuple[bytes, str]]] = {b"": []}
    kinds: dict[bytes, str] = {}
    for path, kind in tree.items():
        raw = os.fsencode(path)
        parent, _, name = raw.rpartition(b"/")
        children.setdefault(parent, []).append((name, kind))
        kinds[raw] = kind
        if kind in (DIR, OPAQUE_DIR):
            children.setdefault(raw, [])
    builder = PackedTreeBuilder()
    for d, entries in children.items():
        builder.add_dir(
            d, kinds.get(d) if d else None, [n for n, _ in entries], "".join(k for _, k in entries)
        )
    return builder.build()


def to_dict(tree: PackedTree) -> dict[str, str]:
    return dict(tree.items())


def base_names(base: Mapping[str, str]) -> Callable[[bytes], frozenset[bytes] | None]:
    """The base's listing of a directory (None where the base has no directory), for the
    packed finders, from a TreeIndex-like dict of the base."""

    def names(directory: bytes) -> frozenset[bytes] | None:
        d = os.fsdecode(directory)
        if d and base.get(d) not in (DIR, OPAQUE_DIR):
            return None
        prefix = d + "/" if d else ""
        return frozenset(
            os.fsencode(p[len(prefix) :])
            for p in base
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    return names
