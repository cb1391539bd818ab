"""The domain's plain data: devices, manifests, volumes, indexes, plans and reports.

Everything here is immutable and free of I/O; adapters convert to these types at the edge.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# One character per directory entry kind in a TreeIndex.
DIR = "d"  # a directory that merges with the same directory in lower layers
OPAQUE_DIR = "o"  # a directory marked trusted.overlay.opaque=y: hides lower layers below it
FILE = "f"
SYMLINK = "l"
WHITEOUT = "w"  # char device 0:0 (or overlay.whiteout xattr): deletes the path below it
CHAR_DEVICE = "c"
BLOCK_DEVICE = "b"
FIFO = "p"
SOCKET = "s"

# A TreeIndex maps a path relative to the hierarchy ("bin/tool", no leading slash; the
# hierarchy's own directory is not a key) to its kind character above.
TreeIndex = Mapping[str, str]


@dataclass(frozen=True)
class BlockDevice:
    """A udev block device, converted at the edge from pyudev."""

    devnode: str  # /dev/loop3
    devnum: tuple[int, int]  # (major, minor)
    properties: Mapping[str, str] = field(hash=False, compare=False)
    diskseq: int = 0  # kernel DISKSEQ; a reattached loop device gets a new one

    @property
    def identity(self) -> str:
        """Stable while the same medium is attached; changes when a device is re-used."""
        return f"{self.devnum[0]}:{self.devnum[1]}:{self.diskseq}"

    @property
    def fs_type(self) -> str:
        return self.properties.get("ID_FS_TYPE", "")


@dataclass(frozen=True)
class OsRelease:
    """The base's os-release, the fields that compatibility needs."""

    id: str
    id_like: tuple[str, ...] = ()
    version_id: str | None = None
    sysext_level: str | None = None
    architecture: str = ""  # the machine's architecture in systemd spelling (x86-64, arm64)


@dataclass(frozen=True)
class Manifest:
    """A personality volume's extension-release file."""

    name: str
    fields: Mapping[str, str] = field(hash=False, compare=False)

    def get(self, key: str) -> str | None:
        return self.fields.get(key)

    @property
    def version(self) -> str:
        return self.fields.get("IMAGE_VERSION") or self.fields.get("VERSION_ID") or ""

    @property
    def description(self) -> str:
        return self.fields.get("PERSONALITY_DESCRIPTION", "")

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self.fields.get("PERSONALITY_SERVICES", "").split())

    @property
    def healthchecks(self) -> tuple[str, ...]:
        """Units a trial starts after the services; each must finish successfully."""
        return tuple(self.fields.get("PERSONALITY_HEALTHCHECK", "").split())


class State(enum.StrEnum):
    AVAILABLE = "available"
    ATTACHED = "attached"
    PENDING = "pending"
    INCOMPATIBLE = "incompatible"
    DRAINING = "draining"
    FAILED = "failed"


IMAGE_FILE = "file"  # an image file (or a symlink to one), stacked through a loop device
IMAGE_DIRECTORY = "directory"  # a directory tree, stacked through a read-only bind mount


@dataclass(frozen=True)
class ImageSource:
    """Where a personality found in a search path comes from (section 10)."""

    kind: str  # IMAGE_FILE or IMAGE_DIRECTORY
    entry: str  # the entry as found, with the root prefix: <root>/var/lib/personalities/web.raw
    target: str  # what it resolves to (the same, or a symlink's target), with the prefix
    file_id: tuple[int, int]  # (st_dev, st_ino) of the target
    rank: int  # index of its search path: lower wins


@dataclass(frozen=True)
class Volume:
    """A present, recognised personality volume."""

    name: str
    device: BlockDevice
    manifest: Manifest
    incompatibility: str | None = None  # reason, or None when compatible with the base
    # Why the volume may never be stacked, not even with `force` (a protected path it
    # provides, deletes or hides); listed as incompatible with this reason. None when fine.
    refusal: str | None = None
    # For a personality from a search path: its entry. Its `device` is then the daemon's own
    # loop device while attached, else a stand-in whose devnode is the file's path (a
    # directory tree's device is always such a stand-in).
    source: ImageSource | None = None

    @property
    def compatible(self) -> bool:
        return self.incompatibility is None


@dataclass(frozen=True)
class DesiredEntry:
    name: str
    force: bool = False


@dataclass(frozen=True)
class Conflict:
    path: str  # as seen in the stacked system, e.g. "/usr/bin/python3"
    hierarchy: str  # "/usr"
    winner: str
    shadowed: tuple[str, ...]  # top first
    identical: bool


MASK_DELETED = "deleted"  # a whiteout over an entry of the base
MASK_HIDDEN = "hidden"  # an opaque directory over a directory of the base


@dataclass(frozen=True)
class Mask:
    """Base content that a personality deletes (whiteout) or hides (opaque directory)."""

    path: str  # as seen in the stacked system, e.g. "/usr/share/doc"
    hierarchy: str  # "/usr"
    name: str  # the personality whose whiteout or opaque directory it is
    mask: str  # MASK_DELETED or MASK_HIDDEN


@dataclass(frozen=True)
class ConflictReport:
    conflicts: tuple[Conflict, ...]
    overrides: int  # paths where a personality replaces an entry of the base
    masks: tuple[Mask, ...] = ()  # base entries deleted or hidden, sorted by path


@dataclass(frozen=True)
class StackPlan:
    """What the stack should look like: the live personalities and each hierarchy's layers."""

    live: tuple[str, ...]  # bottom first (attach order)
    layers: Mapping[str, tuple[str, ...]]  # hierarchy -> personality names, top first


@dataclass(frozen=True)
class PersonalityInfo:
    name: str
    state: str  # model.State value
    version: str
    device: str  # device node, or "" when the volume is absent
    mount_point: str  # "<mount_root>/<name>" as seen on the real system, or "" when not mounted
    reason: str = ""  # why pending / incompatible / failed
    description: str = ""


@dataclass(frozen=True)
class StackEvent:
    """Emitted after every change of the live stack, whatever caused it."""

    generation: int
    attached: tuple[str, ...]  # bottom first
    newly_attached: tuple[str, ...]
    detached: tuple[str, ...]
    # False when only the desired list changed (e.g. a personality whose volume is missing
    # was asked for): properties change, but there is no new stack to signal.
    stack_changed: bool = True
