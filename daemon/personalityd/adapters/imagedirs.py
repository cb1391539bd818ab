"""The search paths of image files and directories: what they offer, and when that changes.

`scan_search_paths` lists every search directory (docs/images.md) and checks every
candidate entry through adapters/trustedpath.py (so a search directory inside a stacked
hierarchy is read from the base, through `views`). Precedence for one name: the search paths
in order, then within one directory core/imagenames.py's order. Only a trusted entry takes a
name: an entry that fails the ownership rules is refused (the caller journals it) and the
next one of that name, if any, wins; every trusted entry after the winner is a duplicate.
A missing search directory offers nothing; one that is untrusted or cannot be listed is
refused as a whole. Two search paths that resolve to the same directory are one.

`SearchPathWatcher` tells when a scan may find something else: inotify on every search
directory that exists and on every directory the walk to it passes (each only for the name
the walk looked up there), so a search directory created later, a directory on the way that
is chmod-ed or renamed, a symlink on the way moved to another directory, are all seen.
What it does not watch: the directory a symlink entry points into when that is another
directory (`/etc/personalities/web.raw -> /srv/images/web_2.raw`): a file replaced or
chmod-ed there is seen at the next scan for another reason, or at `Refresh()`.

The scan never follows a symlink except through open_trusted; listing is by the descriptor
that open_trusted opened.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

import structlog
from asyncinotify import Event, Inotify, Mask

from personalityd.adapters.trustedpath import Opened, UntrustedPath, open_trusted, trace_path
from personalityd.core.imagenames import Listed, ListedKind, select_entries

log = structlog.get_logger(__name__)

EntryKind = Literal["file", "dir", "symlink"]

_NO_VIEWS: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True)
class FoundEntry:
    """A trusted entry of a search path.

    `path` is the entry as found (`<root>/etc/personalities/web.raw`), `kind` what it is
    there; `target` is the file or directory it resolves to (the same path, or a symlink's
    target, with the root prefix: the device column), `file_id` that one's (st_dev, st_ino),
    so a file renamed over the entry is a different one; `rank` the index of its search path
    (lower wins).
    """

    name: str
    path: str
    kind: EntryKind
    rank: int
    target: str
    file_id: tuple[int, int]


@dataclass(frozen=True)
class RefusedEntry:
    """An entry, or a whole search directory, that the scan refused: `reason` is the one line
    saying why (it names the path at fault, which may be a symlink's target or a directory on
    the way). `name` is the personality name when an entry was refused."""

    path: str
    reason: str
    name: str | None = None


@dataclass(frozen=True)
class ScanResult:
    """`entries`: one per name, sorted by name. `duplicates`: (loser, winner) for every other
    trusted entry of a name, in scan order. `refused`: in scan order."""

    entries: list[FoundEntry] = field(default_factory=list)
    refused: list[RefusedEntry] = field(default_factory=list)
    duplicates: list[tuple[FoundEntry, FoundEntry]] = field(default_factory=list)


def _display(root: str, path: str) -> str:
    return root.rstrip("/") + path if path != "/" else (root.rstrip("/") or "/")


def _relative(root: str, logical: str) -> str:
    """`<root>/var/lib/x` -> `/var/lib/x`: a logical path as open_trusted takes it."""
    prefix = root.rstrip("/")
    if not prefix:
        return logical
    return logical[len(prefix) :] or "/"


def _reason(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc.strerror or exc)


def _listed_kind(mode: int) -> ListedKind:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _list_directory(fd: int) -> list[Listed]:
    """Every entry of the directory open at `fd`, as it is (nothing followed); entries that
    vanish while listing are left out."""
    listing: list[Listed] = []
    for filename in os.listdir(fd):
        try:
            st = os.stat(filename, dir_fd=fd, follow_symlinks=False)
            kind = _listed_kind(st.st_mode)
            target = os.readlink(filename, dir_fd=fd) if kind == "symlink" else None
        except FileNotFoundError:
            continue
        listing.append(Listed(filename, kind, target))
    return listing


def _entry_kind(opened: Opened) -> EntryKind:
    if opened.symlinks:
        return "symlink"
    return "dir" if stat.S_ISDIR(opened.st.st_mode) else "file"


@dataclass
class _Scan:
    root: str
    views: Mapping[str, str]
    result: ScanResult = field(default_factory=ScanResult)
    winners: dict[str, FoundEntry] = field(default_factory=dict)
    directories: set[tuple[int, int]] = field(default_factory=set)

    def directory(self, rank: int, search_path: str) -> None:
        shown = _display(self.root, search_path)
        try:
            opened = open_trusted(self.root, search_path, self.views, want="dir")
        except FileNotFoundError:
            return
        except UntrustedPath as exc:
            self.result.refused.append(RefusedEntry(shown, str(exc)))
            return
        except OSError as exc:
            self.result.refused.append(RefusedEntry(shown, f"cannot be searched: {_reason(exc)}"))
            return
        try:
            identity = (opened.st.st_dev, opened.st.st_ino)
            if identity in self.directories:
                return
            self.directories.add(identity)
            try:
                listing = _list_directory(opened.fd)
            except OSError as exc:
                reason = f"cannot be listed: {exc.strerror}"
                self.result.refused.append(RefusedEntry(opened.logical_path, reason))
                return
        finally:
            os.close(opened.fd)
        directory = _relative(self.root, opened.logical_path)
        for candidate in select_entries(listing):
            for listed in candidate.options:
                self.entry(rank, candidate.name, directory, listed)

    def entry(self, rank: int, name: str, directory: str, listed: Listed) -> None:
        relative = f"{directory.rstrip('/')}/{listed.filename}"
        shown = _display(self.root, relative)
        want: Literal["file", "dir"] = "dir" if listed.kind == "dir" else "file"
        try:
            opened = open_trusted(self.root, relative, self.views, want=want)
        except FileNotFoundError as exc:
            if exc.filename == shown:
                return  # gone since the listing
            self.result.refused.append(RefusedEntry(shown, _reason(exc), name))
            return
        except UntrustedPath as exc:
            self.result.refused.append(RefusedEntry(shown, str(exc), name))
            return
        except OSError as exc:
            self.result.refused.append(RefusedEntry(shown, _reason(exc), name))
            return
        os.close(opened.fd)
        found = FoundEntry(
            name=name,
            path=shown,
            kind=_entry_kind(opened),
            rank=rank,
            target=opened.logical_path,
            file_id=(opened.st.st_dev, opened.st.st_ino),
        )
        winner = self.winners.get(name)
        if winner is None:
            self.winners[name] = found
        else:
            self.result.duplicates.append((found, winner))


def scan_search_paths(
    root: str, search_paths: Sequence[str], views: Mapping[str, str] = _NO_VIEWS
) -> ScanResult:
    """What the search paths (absolute, taken from `root`, in precedence order) offer now.

    Blocking (a worker thread's job). Never raises for what it finds: a problem with an
    entry or a directory is a RefusedEntry; only `root` itself missing is an OSError.
    """
    for search_path in search_paths:
        if not search_path.startswith("/"):
            raise ValueError(f"a search path must be absolute, not {search_path!r}")
    os.stat(root)
    scan = _Scan(root, views)
    for rank, search_path in enumerate(search_paths):
        scan.directory(rank, search_path)
    scan.result.entries.extend(scan.winners[name] for name in sorted(scan.winners))
    return scan.result


@dataclass
class _Role:
    """What one watched directory is to the search paths: a search directory (`search`:
    every entry counts), and/or a directory on the way to one (`names`: only those)."""

    search: bool = False
    names: set[str] = field(default_factory=set)


class SearchPathWatcher:
    """Tells, through `changes()`, when `scan_search_paths` may find something else.

    The watches are set when the watcher is made: make it first, then scan, and nothing that
    happens in between is missed. `changes()` yields once per burst of events (events less
    than COALESCE_SECONDS apart, for at most MAX_BURST_SECONDS), also after an inotify queue
    overflow; the caller scans again after each. Events on the stacked view of a hierarchy
    are never seen: the watches are on the directories the walk reads (`views`).

    Stop iterating first (cancel, or `aclose()` the generator), then `close()`; or use the
    watcher as a context manager.
    """

    COALESCE_SECONDS: Final = 0.05
    MAX_BURST_SECONDS: Final = 1.0
    MASK: Final = (
        Mask.CREATE
        | Mask.DELETE
        | Mask.MOVED_TO
        | Mask.MOVED_FROM
        | Mask.CLOSE_WRITE
        | Mask.ATTRIB
        | Mask.DELETE_SELF
        | Mask.MOVE_SELF
        | Mask.ONLYDIR
    )
    # Events after which the set of watched directories may differ.
    _MOVED: Final = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.UNMOUNT

    def __init__(
        self, root: str, search_paths: Sequence[str], views: Mapping[str, str] = _NO_VIEWS
    ) -> None:
        self.root = root
        self.search_paths = tuple(search_paths)
        self.views = views
        self._inotify: Inotify | None = None
        self._roles: dict[int, _Role] = {}
        self._rearm = False
        self._arm()

    def __enter__(self) -> SearchPathWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    @property
    def watched(self) -> int:
        """How many directories are watched now."""
        return len(self._roles)

    def _arm(self) -> None:
        """Watch anew, from a fresh walk of every search path (a fresh inotify instance: the
        caller scans after this anyway, so events still queued on the old one are moot)."""
        inotify = Inotify(cache_size=256)
        roles: dict[int, _Role] = {}
        try:
            # asyncinotify 4.x defines InitFlags.NONBLOCK as O_CLOEXEC, so its descriptor
            # blocks; draining with sync_get must never block the event loop.
            os.set_blocking(inotify.fd, False)
            for search_path in self.search_paths:
                with trace_path(self.root, search_path, self.views) as trace:
                    for directory, name in trace.lookups:
                        role = self._watch(inotify, roles, directory)
                        if role is not None:
                            role.names.add(name)
                    if trace.found is not None:
                        role = self._watch(inotify, roles, trace.found)
                        if role is not None:
                            role.search = True
        except BaseException:
            inotify.close()
            raise
        self.close()
        self._inotify = inotify
        self._roles = roles
        self._rearm = False

    def _watch(self, inotify: Inotify, roles: dict[int, _Role], fd: int) -> _Role | None:
        try:
            watch = inotify.add_watch(f"/proc/self/fd/{fd}", self.MASK)
        except OSError as exc:
            # Not a directory any more, or gone: the watch on its parent sees what comes next.
            log.debug("search_path_watch_failed", error=str(exc))
            return None
        return roles.setdefault(watch.wd, _Role())

    def _relevant(self, event: Event) -> bool:
        """Whether the event may change what a scan finds; notes when to watch anew."""
        if Mask.Q_OVERFLOW in event.mask:
            log.info("search_path_queue_overflow")
            self._rearm = True
            return True
        watch = event.watch
        role = None if watch is None else self._roles.get(watch.wd)
        if role is None:
            return False
        if event.mask & self._MOVED:
            self._rearm = True
            return True
        if event.name is None:
            return True  # the directory itself: its owner or mode
        name = str(event.name)
        if name in role.names:
            self._rearm = True
            return True
        return role.search

    def _drain(self) -> bool:
        """Take every event already there without waiting; True if one was relevant."""
        relevant = False
        while self._inotify is not None:
            try:
                event = self._inotify.sync_get()
            except BlockingIOError:
                break
            if event is None:
                break
            relevant = self._relevant(event) or relevant
        return relevant

    async def changes(self) -> AsyncGenerator[None, None]:
        """Yield once per burst of relevant events, forever."""
        loop = asyncio.get_running_loop()
        while True:
            inotify = self._inotify
            if inotify is None:
                raise RuntimeError("SearchPathWatcher is closed")
            if not self._relevant(await inotify.get()):
                continue
            deadline = loop.time() + self.MAX_BURST_SECONDS
            while True:
                await asyncio.sleep(self.COALESCE_SECONDS)
                if not self._drain() or loop.time() >= deadline:
                    break
            if self._rearm:
                self._arm()
            yield


__all__ = [
    "FoundEntry",
    "RefusedEntry",
    "ScanResult",
    "SearchPathWatcher",
    "scan_search_paths",
]
