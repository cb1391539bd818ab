"""Where the stack lives under `root`, and the plain records of what is mounted there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personalityd.config import Config
from personalityd.core.names import hierarchy_key


@dataclass(frozen=True)
class Upper:
    """Where overlay writes go: a writable volume, a tmpfs, or nowhere (read-only stack)."""

    kind: str  # "volume", "tmpfs", "none"
    root: str | None  # mounted directory holding upper/ and work/
    device: str  # what WritableDevice shows: device node, "tmpfs" or ""
    # On a btrfs writable volume: the live subvolume that `root` is (stack/upperdata.py).
    live: str | None = None

    def upper_dir(self, hierarchy: str) -> str | None:
        return None if self.root is None else f"{self.root}/upper/{hierarchy_key(hierarchy)}"

    def work_parent(self, hierarchy: str) -> str | None:
        return None if self.root is None else f"{self.root}/work/{hierarchy_key(hierarchy)}"


NO_UPPER = Upper("none", None, "")


@dataclass(frozen=True)
class OverlaySpec:
    layers: tuple[str, ...]  # lower directories, top first, the base reference last
    upper: str | None
    # The identities of the volume mounts the layers are on, top first: a volume mounted
    # anew at the same path (an image file re-attached by Refresh) makes a new overlay.
    identities: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "layers": list(self.layers),
            "upper": self.upper,
            "identities": list(self.identities),
        }


@dataclass
class MountedVolume:
    name: str
    identity: str
    devnode: str
    path: str


class Layout:
    """Where things live under `root`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mount_root = str(config.mount_root_path)
        self.runtime = str(config.runtime_path)
        self.record_file = Path(self.runtime) / "stack.json"
        self.loops_file = Path(self.runtime) / "loops.json"  # the daemon's own loop devices

    def hierarchy(self, h: str) -> str:
        return str(self.config.path(h))

    def base_ref(self, h: str) -> str:
        return f"{self.runtime}/base/{hierarchy_key(h)}"

    def volume_dir(self, name: str) -> str:
        return f"{self.mount_root}/{name}"

    def layer_dir(self, name: str, h: str) -> str:
        return f"{self.mount_root}/{name}{h}"

    def meta(self, h: str) -> str:
        """The metadata layer: an empty directory with the base's mode, owner and group, on
        top of a read-only stack whose top personality's directory differs from the base."""
        return f"{self.runtime}/meta/{hierarchy_key(h)}"

    def staging(self, h: str) -> str:
        return f"{self.runtime}/staging/{hierarchy_key(h)}"

    def links(self, h: str) -> str:
        return f"{self.runtime}/links/{hierarchy_key(h)}"

    def writable(self) -> str:
        return f"{self.runtime}/writable"

    def volatile(self) -> str:
        return f"{self.runtime}/volatile"
