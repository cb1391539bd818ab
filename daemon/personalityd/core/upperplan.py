"""Which parts of an install's overlay upper a personality carries, and as what.

The builder installs packages into an overlay over the base and then sorts every entry of the
overlay's upper directory into one of these routes:

- `keep`: shipped at the same path (`usr/`, `etc/`, `opt/`), or moved under `usr/` when the base
  is not merged-/usr (`bin/`, `sbin/`, `lib*/`);
- `var`: `/var` content, turned into tmpfiles.d lines (`core/tmpfiles`);
- `enable`: a unit enablement link (`etc/systemd/system/*.wants/UNIT`), which names a service;
- `drop`: never shipped, with the reason.

`plan()` applies the routes to the whole upper: deletions of base files (whiteouts, opaque
marks on directories the base has) are dropped and listed, directories that hold nothing kept
are left out, and files of the base the personality replaces are listed. (Set-id bits and file
capabilities are removed from the finished tree by the builder, `builder/trees.py`.)

Pure: the entries are read by the builder (`builder/upper.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from personalityd.core.protected import DEFAULT_PROTECTED_PATHS

DIR: Final = "dir"
FILE: Final = "file"
SYMLINK: Final = "symlink"
WHITEOUT: Final = "whiteout"
OTHER: Final = "other"  # device nodes, fifos, sockets

KEEP: Final = "keep"
VAR: Final = "var"
ENABLE: Final = "enable"
DROP: Final = "drop"

CARRIED_TOPS: Final = ("usr", "etc", "opt")
USR_MERGED_TOPS: Final = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
SYSTEMD_SYSTEM: Final = "etc/systemd/system/"
ENABLE_SUFFIXES: Final = (".wants", ".requires", ".upholds")
ACCOUNT_FILES: Final = frozenset(
    f"etc/{name}{suffix}"
    for name in ("passwd", "shadow", "group", "gshadow", "subuid", "subgid")
    for suffix in ("", "-")
) | {"etc/.pwd.lock"}
PROTECTED: Final = tuple(p.lstrip("/") for p in DEFAULT_PROTECTED_PATHS)
RUNNING_SYSTEM: Final = frozenset({"etc/resolv.conf", "etc/machine-id", "etc/mtab", "etc/hostname"})

R_ACCOUNTS: Final = "account database (the users and groups became sysusers.d lines)"
R_PROTECTED: Final = "protected path"
R_LDCACHE: Final = "the dynamic linker's cache (made by ldconfig at attach)"
R_RUNNING: Final = "belongs to the running system"
R_POLICY: Final = "the builder's own policy-rc.d"
R_OUTSIDE: Final = "outside usr/, etc/, opt/ and var/"
R_SYSV: Final = "SysV init enablement (PERSONALITY_SERVICES names what runs)"
R_USER_UNITS: Final = "user unit enablement"
R_MASKED: Final = "unit masked by a script"
R_PKGSTATE: Final = "package manager state"
R_VAR_TRANSIENT: Final = "log or cache written during the build"
R_VAR_BASE_FILE: Final = "changes a file of the base under /var (tmpfiles.d cannot)"
R_WHITEOUT: Final = "deletes a file of the base (the base's file shows through)"
R_SPECIAL: Final = "device node, fifo or socket"
R_DUPLICATE: Final = "also under usr/ (the usr/ copy is kept)"

VAR_DROPPED: Final = (
    "var/cache/apt",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/log/apt",
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/cache/debconf",
    "var/lib/systemd/deb-systemd-helper-enabled",
    "var/lib/systemd/deb-systemd-user-helper-enabled",
    "var/lib/systemd/deb-systemd-helper-masked",
    "var/cache/ldconfig",
    "var/lib/ucf",
    "var/log/lastlog",
    "var/log/faillog",
    "var/log/wtmp",
    "var/log/btmp",
    "var/lib/dbus/machine-id",
    "var/tmp",
    "var/run",
    "var/lock",
)
VAR_TRANSIENT_FILES: Final = ("var/log", "var/cache")


@dataclass(frozen=True)
class Entry:
    """One entry of the upper directory, as lstat and the xattrs show it."""

    path: str  # relative to the upper's root: 'usr/bin/x'
    kind: str
    mode: int = 0o755  # permission bits, set-id bits included
    uid: int = 0
    gid: int = 0
    target: str = ""  # a symlink's target
    opaque: bool = False  # trusted.overlay.opaque
    in_base: str | None = None  # the kind of the base's entry at the same path, if any
    base_meta: tuple[int, int, int] | None = None  # the base's (mode, uid, gid) there


@dataclass(frozen=True)
class Route:
    action: str
    dest: str = ""  # keep: where it goes in the image
    reason: str = ""  # drop: why


@dataclass
class Plan:
    keep: list[tuple[Entry, str]] = field(default_factory=list)  # (entry, image path), in order
    var: list[Entry] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)  # unit names, in path order
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    deletions: list[str] = field(default_factory=list)  # whiteouts and opaque marks not carried
    overridden: list[str] = field(default_factory=list)  # base files the image replaces


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def is_enable_link(path: str) -> bool:
    """Whether `path` (of a symlink) enables a unit: etc/systemd/system/X.wants/UNIT."""
    if not path.startswith(SYSTEMD_SYSTEM):
        return False
    parts = path[len(SYSTEMD_SYSTEM) :].split("/")
    return len(parts) == 2 and parts[0].endswith(ENABLE_SUFFIXES)


def _etc_route(entry: Entry) -> Route | None:
    path = entry.path
    if path in ACCOUNT_FILES:
        return Route(DROP, reason=R_ACCOUNTS)
    if path == "etc/ld.so.cache":
        return Route(DROP, reason=R_LDCACHE)
    if path in RUNNING_SYSTEM:
        return Route(DROP, reason=R_RUNNING)
    if entry.kind == SYMLINK and is_enable_link(path):
        return Route(ENABLE)
    if path.startswith("etc/systemd/user/") and entry.kind == SYMLINK:
        parts = path.split("/")
        if len(parts) == 5 and parts[3].endswith(ENABLE_SUFFIXES):
            return Route(DROP, reason=R_USER_UNITS)
    if entry.kind == SYMLINK and path.startswith(SYSTEMD_SYSTEM) and entry.target == "/dev/null":
        return Route(DROP, reason=R_MASKED)
    parts = path.split("/")
    if len(parts) == 3 and len(parts[1]) == 5 and parts[1][:2] == "rc" and parts[1][3:] == ".d":
        return Route(DROP, reason=R_SYSV)
    return None


def _var_route(entry: Entry) -> Route:
    for prefix in VAR_DROPPED:
        if _under(entry.path, prefix):
            return Route(DROP, reason=R_PKGSTATE)
    if entry.kind != DIR and any(_under(entry.path, p) for p in VAR_TRANSIENT_FILES):
        return Route(DROP, reason=R_VAR_TRANSIENT)
    return Route(VAR)


def route(entry: Entry) -> Route:
    """Where one upper entry goes."""
    path = entry.path
    top = path.split("/", 1)[0]
    for protected in PROTECTED:
        if _under(path, protected):
            return Route(DROP, reason=R_ACCOUNTS if path in ACCOUNT_FILES else R_PROTECTED)
    if entry.kind == OTHER:
        return Route(DROP, reason=R_SPECIAL)
    if top == "etc" and (special := _etc_route(entry)) is not None:
        return special
    if path == "usr/sbin/policy-rc.d":
        return Route(DROP, reason=R_POLICY)
    if top in CARRIED_TOPS:
        return Route(KEEP, dest=path)
    if top in USR_MERGED_TOPS:
        return Route(KEEP, dest=f"usr/{path}")
    if top == "var":
        return _var_route(entry)
    return Route(DROP, reason=R_OUTSIDE)


def plan(entries: Sequence[Entry]) -> Plan:
    """Sort the upper's entries (any order) into what the image carries; see the module doc."""
    result = Plan()
    # Entries moved under usr/ come after usr/'s own: on a path both have, usr/ wins.
    ordered = sorted(
        entries, key=lambda e: (e.path.split("/")[0] in USR_MERGED_TOPS, e.path.split("/"))
    )
    kept_files: dict[str, Entry] = {}
    kept_dirs: dict[str, Entry] = {}
    has_children: set[str] = set()
    dropped_dirs: dict[str, str] = {}
    for entry in ordered:
        if "/" in entry.path:
            has_children.add(entry.path.rsplit("/", 1)[0])
    for entry in ordered:
        if entry.kind == WHITEOUT:
            result.deletions.append(entry.path)
            result.dropped.append((entry.path, R_WHITEOUT))
            continue
        r = route(entry)
        if r.action == DROP:
            _drop(result, dropped_dirs, entry, r.reason)
        elif r.action == ENABLE:
            result.enabled.append(entry.path.rsplit("/", 1)[1])
        elif r.action == VAR:
            result.var.append(entry)
        elif entry.kind == DIR:
            if entry.opaque and entry.in_base == DIR:
                result.deletions.append(entry.path + "/")
            kept_dirs.setdefault(r.dest, entry)
        elif r.dest in kept_files:
            result.dropped.append((entry.path, R_DUPLICATE))
        else:
            kept_files[r.dest] = entry
    needed = _needed_dirs(kept_files, kept_dirs, has_children)
    for dest in sorted(set(kept_files) | needed, key=lambda p: p.split("/")):
        entry = kept_files.get(dest) or kept_dirs[dest]
        result.keep.append((entry, dest))
        if entry.kind != DIR and entry.in_base is not None:
            result.overridden.append(dest)
    return result


def _drop(result: Plan, dropped_dirs: dict[str, str], entry: Entry, reason: str) -> None:
    """List a dropped entry, unless a dropped directory above it says the same."""
    parts = entry.path.split("/")
    for i in range(1, len(parts)):
        if dropped_dirs.get("/".join(parts[:i])) == reason:
            return
    if entry.kind == DIR:
        dropped_dirs[entry.path] = reason
        result.dropped.append((entry.path + "/", reason))
    else:
        result.dropped.append((entry.path, reason))


def _needed_dirs(
    files: dict[str, Entry], dirs: dict[str, Entry], has_children: set[str]
) -> set[str]:
    """Directories that hold something kept, and new directories that were empty anyway."""
    needed: set[str] = set()
    for dest in files:
        needed.update(a for a in _ancestors(dest) if a in dirs)
    for dest, entry in dirs.items():
        if entry.in_base is None and entry.path not in has_children:
            needed.add(dest)
            needed.update(a for a in _ancestors(dest) if a in dirs)
    return needed


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
