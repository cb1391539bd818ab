"""Open a path under `root` the way a root daemon must when the path is not its own.

The path string is never handed to the kernel whole. The walk starts from a descriptor of
`root` and opens one component at a time (`openat` with O_PATH|O_NOFOLLOW), so what each step
checks is what the next step starts from, whatever is renamed meanwhile:

- every directory from `root` (included) down to the entry, the entry, and the file it finally
  resolves to must be owned by uid 0 and writable by nobody else (no group or other write
  bit; an ACL granting writes shows in the group bits, so it is refused too); a symlink on the
  way must be owned by uid 0 (its own mode means nothing). Anything else is UntrustedPath,
  naming the path and the problem.
- symlinks are resolved inside `root`, as RESOLVE_IN_ROOT does: an absolute target starts
  again from `root`, `..` never climbs above it; at most 40 are followed (ELOOP).
- `views` maps a stacked hierarchy (`/usr`, as a path under `root`) to the directory read
  instead: the daemon's read-only reference to its base (stack/layout.py `Layout.base_ref`).
  Whenever the walk enters the hierarchy, by the path itself, a symlink or `..`, it goes on in
  that directory, so nothing a personality ships can add an entry or swap an image. The paths
  the caller sees stay the logical ones (`<root>/usr/lib/personalities/web.raw`).

The final file is opened by name from its directory's descriptor (O_NOFOLLOW, O_NONBLOCK, so
neither a symlink nor a FIFO swapped in can redirect or block the open) and must be the very
inode the walk checked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from personalityd.adapters.probe import file_kind
from personalityd.core.errors import PersonalityError

MAX_SYMLINKS: Final = 40  # as the kernel's path walk

Want = Literal["file", "dir", "any"]

_NO_VIEWS: Final[Mapping[str, str]] = MappingProxyType({})
_O_PATH_NOFOLLOW: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITING_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class UntrustedPath(PersonalityError):
    """A path the root daemon refuses to use: the message names the path and the problem,
    e.g. `/var/lib/personalities/web.raw is owned by uid 1000, not root`. `path` is the
    logical path at fault (with the root prefix)."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Opened:
    """What `open_trusted` opened. The caller closes `fd`.

    `logical_path` is where the walk ended, with the root prefix (a symlink's target, not the
    symlink: `<root>/var/lib/personalities/web_1.2.raw`); `st` is the fstat of `fd`;
    `symlinks` are the links followed on the way, as logical paths, in walk order.
    """

    fd: int
    logical_path: str
    st: os.stat_result
    symlinks: tuple[str, ...]


@dataclass(frozen=True)
class Trace:
    """Where a walk went (`trace_path`), for watching it rather than trusting it.

    `lookups` are (O_PATH descriptor of a directory, the name looked up in it), in walk
    order, including the last one tried when the walk failed; `found` is the O_PATH descriptor
    of the directory the path resolves to, None when it does not resolve to one. The
    descriptors stay valid until the `trace_path` block ends.
    """

    lookups: tuple[tuple[int, str], ...]
    found: int | None
    logical_path: str | None


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _view_table(views: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for hierarchy, directory in views.items():
        key = tuple(_components(hierarchy))
        if not hierarchy.startswith("/") or not key or ".." in key:
            raise ValueError(f"a view needs an absolute hierarchy below /, not {hierarchy!r}")
        table[key] = directory
    return table


@dataclass
class _Node:
    logical: tuple[str, ...]
    fd: int  # O_PATH
    st: os.stat_result


@dataclass
class _Walk:
    """One component-by-component walk. Every descriptor it opens stays open until close(),
    so a Trace can hand out the directories it passed."""

    root: str
    views: dict[tuple[str, ...], str]
    checked: bool
    stack: list[_Node] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    lookups: list[tuple[int, str]] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)

    def display(self, logical: tuple[str, ...]) -> str:
        prefix = self.root.rstrip("/")
        if not logical:
            return prefix or "/"
        return prefix + "/" + "/".join(logical)

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _open(self, path: str, flags: int, dir_fd: int | None = None) -> int:
        fd = os.open(path, flags, dir_fd=dir_fd)
        self._fds.append(fd)
        return fd

    def _check(self, logical: tuple[str, ...], st: os.stat_result) -> None:
        if not self.checked:
            return
        shown = self.display(logical)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise UntrustedPath(
                    f"{shown} is a symlink owned by uid {st.st_uid}, not root", path=shown
                )
            return
        if st.st_uid != 0:
            raise UntrustedPath(f"{shown} is owned by uid {st.st_uid}, not root", path=shown)
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            raise UntrustedPath(f"{shown} is writable by others (mode {mode:04o})", path=shown)
        if mode & stat.S_IWGRP:
            raise UntrustedPath(f"{shown} is writable by its group (mode {mode:04o})", path=shown)

    def _push(self, logical: tuple[str, ...], fd: int) -> None:
        st = os.fstat(fd)
        self._check(logical, st)
        self.stack.append(_Node(logical, fd, st))

    def _not_a_directory(self, node: _Node) -> OSError:
        return NotADirectoryError(
            errno.ENOTDIR,
            f"Not a directory (it is {file_kind(node.st.st_mode)})",
            self.display(node.logical),
        )

    def start(self) -> None:
        self._push((), self._open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))

    def walk(self, path: str) -> _Node:
        """Resolve `path` (absolute, taken from `root`) and return its final node."""
        if not path.startswith("/"):
            raise ValueError(f"path must be absolute (taken from root), not {path!r}")
        del self.stack[1:]
        pending = _components(path)
        while pending:
            name = pending.pop(0)
            top = self.stack[-1]
            if not stat.S_ISDIR(top.st.st_mode):
                raise self._not_a_directory(top)
            if name == "..":
                if len(self.stack) > 1:
                    self.stack.pop()
                continue
            logical = (*top.logical, name)
            view = self.views.get(logical)
            if view is not None:
                self._push(logical, self._open(view, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                continue
            self.lookups.append((top.fd, name))
            try:
                fd = self._open(name, _O_PATH_NOFOLLOW, dir_fd=top.fd)
            except OSError as exc:
                raise type(exc)(exc.errno, exc.strerror, self.display(logical)) from None
            st = os.fstat(fd)
            if not stat.S_ISLNK(st.st_mode):
                self._push(logical, fd)
                continue
            self._check(logical, st)
            self.symlinks.append(self.display(logical))
            if len(self.symlinks) > MAX_SYMLINKS:
                raise OSError(
                    errno.ELOOP,
                    f"Too many levels of symbolic links (more than {MAX_SYMLINKS})",
                    self.display(tuple(_components(path))),
                )
            # Read from the descriptor: the very link that was checked, not one renamed in.
            target = os.readlink("", dir_fd=fd)
            if not target:
                raise FileNotFoundError(
                    errno.ENOENT, "Symlink with an empty target", self.display(logical)
                )
            if target.startswith("/"):
                del self.stack[1:]
            pending[:0] = _components(target)
        return self.stack[-1]


def _want_problem(want: Want, mode: int) -> str | None:
    if want == "file" and not stat.S_ISREG(mode):
        return f"is {file_kind(mode)}, not a regular file"
    if want == "dir" and not stat.S_ISDIR(mode):
        return f"is {file_kind(mode)}, not a directory"
    if want == "any" and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return f"is {file_kind(mode)}, not a regular file or directory"
    return None


def _open_final(walk: _Walk, node: _Node, flags: int) -> int:
    """A real descriptor of the walk's final node, checked to be that same inode."""
    if stat.S_ISDIR(node.st.st_mode):
        # Opened through the O_PATH descriptor itself: no name, nothing to swap.
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
    parent = walk.stack[-2]
    name = node.logical[-1]
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent.fd)
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def open_trusted(
    root: str,
    path: str,
    views: Mapping[str, str] = _NO_VIEWS,
    *,
    want: Want = "file",
    flags: int = os.O_RDONLY,
) -> Opened:
    """Open `path` (absolute, taken from `root`) after checking everything on the way.

    `want` is what the path must resolve to: `file` (a regular file, opened with `flags`
    plus O_NOFOLLOW|O_CLOEXEC), `dir` (opened O_RDONLY|O_DIRECTORY) or `any` of the two.
    Raises UntrustedPath (ownership, mode, wrong kind, replaced while being opened),
    FileNotFoundError / NotADirectoryError naming the logical path of the missing or wrong
    component, OSError ELOOP past 40 symlinks. `flags` may not ask for writing: the daemon
    never opens what it did not write itself for writing.
    """
    if flags & _WRITING_FLAGS:
        raise ValueError("open_trusted opens for reading only")
    walk = _Walk(root, _view_table(views), checked=True)
    try:
        walk.start()
        node = walk.walk(path)
        shown = walk.display(node.logical)
        problem = _want_problem(want, node.st.st_mode)
        if problem is not None:
            raise UntrustedPath(f"{shown} {problem}", path=shown)
        fd = _open_final(walk, node, flags)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (node.st.st_dev, node.st.st_ino):
                raise UntrustedPath(f"{shown} was replaced while it was being opened", path=shown)
            walk._check(node.logical, st)  # its mode may have changed since the walk saw it
        except BaseException:
            os.close(fd)
            raise
        return Opened(fd, shown, st, tuple(walk.symlinks))
    finally:
        walk.close()


def check_trusted_dir(root: str, path: str, views: Mapping[str, str] = _NO_VIEWS) -> None:
    """Check that `path` (a search directory) and everything on the way to it may be
    trusted; raises as `open_trusted(..., want="dir")` does."""
    opened = open_trusted(root, path, views, want="dir")
    os.close(opened.fd)


@contextlib.contextmanager
def trace_path(root: str, path: str, views: Mapping[str, str] = _NO_VIEWS) -> Iterator[Trace]:
    """Walk `path` as `open_trusted` would, without judging it, and give the directories it
    passed (to watch them: a search directory that is missing or untrusted now may be fine
    later). A walk that fails (missing component, loop) ends the trace where it failed;
    `root` itself missing is the caller's OSError."""
    walk = _Walk(root, _view_table(views), checked=False)
    try:
        walk.start()
        found: _Node | None
        try:
            found = walk.walk(path)
        except OSError:
            found = None
        if found is not None and not stat.S_ISDIR(found.st.st_mode):
            found = None
        yield Trace(
            lookups=tuple(walk.lookups),
            found=None if found is None else found.fd,
            logical_path=None if found is None else walk.display(found.logical),
        )
    finally:
        walk.close()
