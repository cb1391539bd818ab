"""Protected paths: what no volume may provide, delete or hide (`volumes.protected_paths`).

A volume touches a protected path P when, in a hierarchy it provides,

- it has an entry at P itself: a file, a directory (merging or opaque: then it provides
  something below P, or could), a symlink, a whiteout that deletes P, anything;
- an ancestor of P below the hierarchy's top is, in the volume, anything but a merging
  directory: a whiteout deletes P with its directory, an opaque directory hides P, and a file
  or symlink replaces the directory that holds P;
- or the hierarchy itself lies inside P (an administrator protecting `/opt` while `/opt/tools`
  is stacked).

The hierarchy's own top directory is never opaque to overlayfs (the kernel ignores the mark
on a layer's root), so it hides nothing. Lower layers cannot change that outcome: overlayfs
reaches P in the base unless some layer has an entry at P or a non-merging one above it, and
that layer's own index shows it. So each volume is judged alone, on its index; `force` never
lets such a volume through, only the configuration does.

Pure: the volume is seen through `provides(hierarchy)` and `kind_at(path)`, fed by an index
(`index_lookup` below, at stack time) or by the probe's look at the mounted tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from personalityd.core.model import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    OPAQUE_DIR,
    SOCKET,
    SYMLINK,
    WHITEOUT,
)
from personalityd.core.packed import PackedTree

DEFAULT_PROTECTED_PATHS = (
    "/etc/personalityd",
    "/usr/lib/personalityd",
    "/etc/os-release",
    "/usr/lib/os-release",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/sudoers",
    "/etc/sudoers.d",
)

# Whether the volume has the hierarchy (`/usr`) as a real directory.
Provides = Callable[[str], bool]
# The kind (core/model.py) of the volume's entry at an absolute path of the stacked system
# (`/usr/lib`), or None when it has nothing there. Asked only below a hierarchy the volume
# provides, and only once every ancestor between the two answered DIR.
KindAt = Callable[[str], "str | None"]

_NOUNS = {
    FILE: "file",
    SYMLINK: "symlink",
    CHAR_DEVICE: "character device",
    BLOCK_DEVICE: "block device",
    FIFO: "FIFO",
    SOCKET: "socket",
}

HINT = "volumes.protected_paths forbids that, even with force"


def protected_violation(
    protected: Sequence[str],
    hierarchies: Sequence[str],
    provides: Provides,
    kind_at: KindAt,
) -> str | None:
    """Why the volume may not be stacked, naming the first protected path it touches (in the
    order of `protected`, then of `hierarchies`); None when it touches none.

    Paths are absolute and normalized, as the configuration has them."""
    for path in protected:
        for hierarchy in hierarchies:
            if not provides(hierarchy):
                continue
            what = _touches(path, hierarchy, kind_at)
            if what is not None:
                return f"{what}; {HINT}"
    return None


def _touches(path: str, hierarchy: str, kind_at: KindAt) -> str | None:
    if _within(hierarchy, path):
        if hierarchy == path:
            return f"it provides the protected path {path}"
        return f"it provides {hierarchy}, inside the protected path {path}"
    if not _within(path, hierarchy):
        return None
    current = hierarchy.rstrip("/")
    components = path[len(current) + 1 :].split("/")
    for depth, component in enumerate(components, start=1):
        current = f"{current}/{component}"
        kind = kind_at(current)
        if kind is None:
            return None
        if depth == len(components):
            return _at_path(path, kind)
        if kind != DIR:
            return _above_path(current, kind, path)
    return None


def _at_path(path: str, kind: str) -> str:
    if kind == WHITEOUT:
        return f"it deletes the protected path {path} (a whiteout)"
    if kind == OPAQUE_DIR:
        return f"it provides the protected path {path} (an opaque directory)"
    return f"it provides the protected path {path}"


def _above_path(where: str, kind: str, path: str) -> str:
    if kind == WHITEOUT:
        return f"its whiteout {where} deletes the directory of the protected path {path}"
    if kind == OPAQUE_DIR:
        return f"its opaque directory {where} hides the protected path {path}"
    noun = _NOUNS.get(kind, "entry")
    return f"its {noun} {where} replaces the directory of the protected path {path}"


def _within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or below it (both absolute and normalized)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def index_lookup(index: Mapping[str, PackedTree]) -> tuple[Provides, KindAt]:
    """`provides` and `kind_at` answered from a volume's index (hierarchy -> tree)."""

    def provides(hierarchy: str) -> bool:
        return hierarchy in index

    def kind_at(path: str) -> str | None:
        for hierarchy, tree in index.items():
            if path != hierarchy and _within(path, hierarchy):
                relative = path[len(hierarchy.rstrip("/")) + 1 :].encode("utf-8", "surrogateescape")
                return _kind_in(tree, relative)
        return None

    return provides, kind_at


def _kind_in(tree: PackedTree, relative: bytes) -> str | None:
    parent, _, name = relative.rpartition(b"/")
    try:
        i = tree.dirs.index(parent)
    except ValueError:
        return None
    return tree.listing(i).get(name)
