"""Conflicts between stacked personalities, found with overlayfs lookup semantics.

Layers are given top first. Overlayfs resolves a path component by component: at each
directory A, the layers that reach A are consulted top first; a regular directory lets the
next layer's entry merge in, an opaque directory lets only its own layer contribute below A,
and a non-directory (file, symlink, whiteout, device, ...) hides A in every layer under it.
The layers that reach a path are therefore always the top ones, down to a limit index; the
base, below every layer, reaches a path only when nothing above it cut the way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from personalityd.core.model import DIR, FILE, OPAQUE_DIR, SYMLINK, Conflict, TreeIndex


def find_conflicts(
    hierarchy: str,
    layers: Sequence[tuple[str, TreeIndex]],
    base_kind: Callable[[str], str | None],
    identical: Callable[[str, Sequence[str]], bool],
) -> tuple[list[Conflict], int]:
    """The conflicts in one hierarchy (sorted by path), and how many base entries are overridden.

    `layers` are (personality name, index) top first. `base_kind(relpath)` says what the base
    has at a path (None: nothing); it is called only for paths where a personality's winning
    entry replaces rather than merges and the base is not already cut off above the path.
    `identical(relpath, names_top_first)` is called only for conflicts whose entries are all
    regular files or all symlinks.
    """
    n = len(layers)  # the index that stands for the base
    names = [name for name, _ in layers]
    trees = [tree for _, tree in layers]

    # Paths that several layers provide, and their providers top first. The set operations
    # run in C and walk the smaller side; only shared paths are visited in Python.
    seen: set[str] = set()
    shared: set[str] = set()
    for tree in trees:
        keys = tree.keys()
        if seen:
            shared.update(keys & seen)
        seen.update(keys)
    del seen
    multi: dict[str, list[int]] = {}
    if shared:
        for k, tree in enumerate(trees):
            for path in tree.keys() & shared:
                providers = multi.get(path)
                if providers is None:
                    multi[path] = [k]
                else:
                    providers.append(k)
    del shared

    # Directory -> the deepest layer index (n: the base too) that reaches its children.
    limits: dict[str, int] = {"": n}

    def cut_at(directory: str, limit: int, hint: int) -> int:
        """The limit below `directory`, given the layers down to `limit` reach it.

        `hint` is a layer with an entry below `directory`: in a well-formed index it is the
        directory's only provider when no other layer has the directory.
        """
        providers = multi.get(directory)
        if providers is None:
            if directory in trees[hint]:
                providers = [hint]
            else:  # an index without the entries of its own parent directories
                providers = [k for k, tree in enumerate(trees) if directory in tree]
        for k in providers:
            if k > limit:
                break
            kind = trees[k][directory]
            if kind == DIR:
                continue
            return k if kind == OPAQUE_DIR else k - 1
        return limit

    def limit_below(directory: str, hint: int) -> int:
        chain: list[str] = []
        while directory not in limits:
            chain.append(directory)
            directory = directory.rpartition("/")[0]
        limit = limits[directory]
        for directory in reversed(chain):
            limit = cut_at(directory, limit, hint)
            limits[directory] = limit
        return limit

    overrides = 0
    # Paths with one provider: only a replacing entry the base still reaches can override.
    for k, tree in enumerate(trees):
        for path, kind in tree.items():
            if kind == DIR or path in multi:
                continue
            parent = path.rpartition("/")[0]
            limit = limits.get(parent)
            if limit is None:
                limit = limit_below(parent, k)
            if limit == n and base_kind(path) is not None:
                overrides += 1

    prefix = hierarchy.rstrip("/") + "/"
    conflicts: list[Conflict] = []
    for path, providers in multi.items():
        limit = limit_below(path.rpartition("/")[0], providers[0])
        reaching = [k for k in providers if k <= limit]
        if not reaching:
            continue
        kinds = [trees[k][path] for k in reaching]
        if len(reaching) > 1 and any(kind != DIR for kind in kinds):
            shown = [names[k] for k in reaching]
            same = False
            if all(kind == FILE for kind in kinds) or all(kind == SYMLINK for kind in kinds):
                same = identical(path, tuple(shown))
            conflicts.append(
                Conflict(
                    path=prefix + path,
                    hierarchy=hierarchy,
                    winner=shown[0],
                    shadowed=tuple(shown[1:]),
                    identical=same,
                )
            )
        if kinds[0] != DIR and limit == n and base_kind(path) is not None:
            overrides += 1
    conflicts.sort(key=lambda c: c.path)
    return conflicts, overrides


def conflict_message(c: Conflict) -> str:
    """The journal MESSAGE for one conflict."""
    shadowed = ", ".join(f"'{name}'" for name in c.shadowed)
    message = f"Conflict on {c.path}: '{c.winner}' (attached last) shadows {shadowed}"
    return message + " (identical content)" if c.identical else message
