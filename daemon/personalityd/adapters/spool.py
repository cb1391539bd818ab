"""The request spool: find request files, read them safely, file results.

A request is `<stem>.json` in the spool directory (dotfiles and `*.result.json` are not
requests). Reading refuses, without opening it, anything that is not a regular file, and
refuses files too large. The owner of the file is who asks: the manager decides whether they
may (core/access.py). After handling, the result is written
as `<stem>.result.json` into `done/` or `failed/`, then the request is moved beside it: a
daemon that dies mid-request finds the request in the spool again at the next start.

Result body: {"id", "status": "ok"|"error", "code", "message", "changed", "attached",
"generation", "finished"}. On success `code` is "" (empty string): the error codes of
the D-Bus API are only for errors, and a string in every result keeps `jq -r .code` simple.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from asyncinotify import Inotify, Mask

from personalityd.adapters.state import write_json_atomic
from personalityd.core.errors import InvalidRequest, PersonalityError

log = structlog.get_logger(__name__)

MAX_REQUEST_SIZE = 64 * 1024
REQUEST_SUFFIX = ".json"
RESULT_SUFFIX = ".result.json"
DONE_DIR = "done"
FAILED_DIR = "failed"

# Spool directory created by the daemon when missing: group members may drop files, the
# sticky bit keeps them from removing each other's.
SPOOL_DIR_MODE = 0o1730  # group may drop requests, not list or read others'
RESULT_DIR_MODE = 0o755

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RequestGone(InvalidRequest):
    """The request file is not there (any more)."""


def is_request_name(name: str) -> bool:
    """True for `x.json`; False for dotfiles, `x.result.json` and other names."""
    return (
        name.endswith(REQUEST_SUFFIX)
        and not name.startswith(".")
        and not name.endswith(RESULT_SUFFIX)
        and len(name) > len(REQUEST_SUFFIX)
    )


# A result is written as a temporary `.<name>.XXXXXXXX.tmp` first (adapters/state.py), and
# every name must fit NAME_MAX: the stem of a request is at most this many bytes, or the
# request is refused and filed under a shortened stem.
NAME_MAX = 255
TEMPORARY_OVERHEAD = len(".") + len(".XXXXXXXX.tmp")
MAX_STEM_BYTES = NAME_MAX - TEMPORARY_OVERHEAD - len(RESULT_SUFFIX)
_SHORTENED_KEEP = MAX_STEM_BYTES - len("~") - 16


@dataclass(frozen=True)
class SpoolFile:
    """A request file's path, its stem (`req-1` for `req-1.json`) and file name, and the
    stem it is filed under (the same, or a shortened one when the name is too long)."""

    path: Path
    stem: str
    name: str
    filed_stem: str

    @classmethod
    def of(cls, path: Path) -> SpoolFile:
        name = path.name
        stem = name[: -len(REQUEST_SUFFIX)] if name.endswith(REQUEST_SUFFIX) else name
        return cls(path=path, stem=stem, name=name, filed_stem=_filed_stem(stem))

    @property
    def shortened(self) -> bool:
        return self.filed_stem != self.stem

    @property
    def filed_name(self) -> str:
        return self.filed_stem + REQUEST_SUFFIX

    @property
    def result_name(self) -> str:
        return self.filed_stem + RESULT_SUFFIX


def _filed_stem(stem: str) -> str:
    """`stem`, or when too long its first bytes, `~` and a digest of the whole (so two long
    names sharing a beginning are filed apart)."""
    raw = os.fsencode(stem)
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:16]
    kept = raw[:_SHORTENED_KEEP].decode("utf-8", errors="ignore")
    while len(os.fsencode(kept)) > _SHORTENED_KEEP:  # a surrogate-escaped byte counts once
        kept = kept[:-1]
    return f"{kept}~{digest}"


def ensure_spool_dirs(spool_dir: Path, group: int | None = None) -> None:
    """Create the spool directory (mode 1730, group `group` when given) and its `done/` and
    `failed/` (0755) where missing. Existing directories are left as the admin made them."""
    if not spool_dir.is_dir():
        spool_dir.mkdir(parents=True, exist_ok=True)
        if group is not None:
            os.chown(spool_dir, 0, group)
        os.chmod(spool_dir, SPOOL_DIR_MODE if group is not None else 0o700)
    for sub in (DONE_DIR, FAILED_DIR):
        directory = spool_dir / sub
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            os.chmod(directory, RESULT_DIR_MODE)


def list_pending(spool_dir: Path) -> list[Path]:
    """The requests in the spool, oldest first by modification time, then by name.

    Every kind of entry with a request name is listed (so a symlink or FIFO gets refused and
    filed in `failed/`), entries that vanish while listing are skipped.
    """
    found: list[tuple[int, str, Path]] = []
    with os.scandir(spool_dir) as entries:
        for entry in entries:
            if not is_request_name(entry.name):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
            found.append((mtime, entry.name, spool_dir / entry.name))
    found.sort()
    return [path for _, _, path in found]


def _kind_name(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check(name: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequest(f"request {name}: refused, it is {_kind_name(st.st_mode)}")
    if st.st_size > MAX_REQUEST_SIZE:
        raise InvalidRequest(f"request {name}: refused, {st.st_size} bytes is larger than 64 KiB")


@dataclass(frozen=True)
class RequestFile:
    body: bytes
    owner: int  # uid of the file's owner: the one who asks


def read_request(path: Path) -> RequestFile:
    """The request file `path`, read without following or blocking on anything.

    Raises InvalidRequest saying why when the request is refused: not a regular file (checked
    with lstat before opening, so symlinks, FIFOs and devices are never opened), larger than
    64 KiB; also when it was swapped while opening, or cannot be read.
    RequestGone (an InvalidRequest) when there is no such file any more: nothing to file, the
    consumer skips it (it may be a path yielded twice and already handled).
    """
    name = path.name
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise RequestGone(f"request {name}: gone before it could be read") from e
    except OSError as e:
        raise InvalidRequest(f"request {name}: cannot be read: {e.strerror}") from e
    _check(name, st)
    spool_file = SpoolFile.of(path)
    if spool_file.shortened:
        raise InvalidRequest(
            f"request {spool_file.filed_name} (name shortened): refused, its name before "
            f".json is {len(os.fsencode(spool_file.stem))} bytes long, more than the "
            f"{MAX_STEM_BYTES} that leave room for the result's file name"
        )
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidRequest(f"request {name}: refused, it is a symlink") from e
        raise InvalidRequest(f"request {name}: cannot be read: {e.strerror}") from e
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise InvalidRequest(f"request {name}: refused, it was replaced while being opened")
        _check(name, opened)
        parts: list[bytes] = []
        size = 0
        while size <= MAX_REQUEST_SIZE:
            chunk = os.read(fd, MAX_REQUEST_SIZE + 1 - size)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise InvalidRequest(f"request {name}: cannot be read: {e.strerror}") from e
    finally:
        os.close(fd)
    if size > MAX_REQUEST_SIZE:
        raise InvalidRequest(f"request {name}: refused, it grew larger than 64 KiB")
    return RequestFile(b"".join(parts), opened.st_uid)


def _now_iso() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_body(
    request_id: str | None,
    error: PersonalityError | None,
    changed: bool,
    attached: Sequence[str],
    generation: int,
    message: str | None = None,
) -> dict[str, Any]:
    """The result of one request. `attached` is the live stack afterwards, bottom first.

    Success: status "ok", code "" (empty: there is no error code), message `message` or a
    summary of the stack. Error: status "error", code `error.code` (kebab case, the D-Bus error
    words), message `str(error)`. `finished` is the ISO 8601 UTC time, e.g.
    `2025-03-01T12:00:00.123Z`.
    """
    if error is None:
        if message is None:
            stack = " ".join(attached) if attached else "no personalities"
            message = (
                f"stack changed to generation {generation}: {stack}"
                if changed
                else f"nothing to change: {stack}"
            )
        status, code = "ok", ""
    else:
        status, code, message = "error", error.code, str(error)
    return {
        "id": request_id,
        "status": status,
        "code": code,
        "message": message,
        "changed": changed,
        "attached": list(attached),
        "generation": generation,
        "finished": _now_iso(),
    }


def _remove(path: Path) -> None:
    """Remove whatever is at `path` (never following a symlink); missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def finish_request(spool_dir: Path, path: Path, ok: bool, result: dict[str, Any]) -> Path:
    """File the handled request `path` under `done/` (ok) or `failed/`; return where it went.

    Writes `<stem>.result.json` there atomically first (a name too long is filed under its
    shortened stem, the request too), then renames the request (whatever it
    is: rename never follows a symlink or opens a FIFO) beside it, replacing an older request
    of the same name. A request of the same name filed earlier in the other directory, and its
    result, are removed, so only the latest outcome can be found. A request that vanished
    meanwhile still gets its result.
    """
    spool_file = SpoolFile.of(path)
    target_dir = spool_dir / (DONE_DIR if ok else FAILED_DIR)
    other_dir = spool_dir / (FAILED_DIR if ok else DONE_DIR)
    _remove(other_dir / spool_file.filed_name)
    _remove(other_dir / spool_file.result_name)
    target_dir.mkdir(mode=RESULT_DIR_MODE, exist_ok=True)
    write_json_atomic(target_dir / spool_file.result_name, result)
    target = target_dir / spool_file.filed_name
    try:
        os.rename(path, target)
    except FileNotFoundError:
        if not os.path.lexists(path):
            log.warning("request_vanished", request=spool_file.name)
            return target
        raise
    except OSError as e:
        # A directory where a file goes, or the other way round: the old one makes way.
        if e.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        _remove(target)
        os.rename(path, target)
    return target


def set_aside(spool_dir: Path, path: Path) -> Path | None:
    """Move a handled request whose result could not be written into `failed/`, so it is not
    run again at the next start; None when that fails too (or it is gone)."""
    spool_file = SpoolFile.of(path)
    target = spool_dir / FAILED_DIR / spool_file.filed_name
    try:
        target.parent.mkdir(mode=RESULT_DIR_MODE, exist_ok=True)
        os.rename(path, target)
    except OSError:
        return None
    return target


class SpoolWatcher:
    """Yields request paths: first those in the spool at start, then each one that arrives.

    The inotify watch starts before the directory is listed, so nothing arriving in between is
    lost. A regular file is yielded when it is renamed in, closed after writing, or hard-linked
    in; other kinds (symlink, FIFO, device, directory) when created, so they can be refused. A
    path is yielded again only when a different file (inode, or change time) has that name.
    After an inotify queue overflow the directory is listed again. A yielded path may be gone
    by the time it is read; the consumer gets InvalidRequest from read_request then.
    """

    MASK = Mask.MOVED_TO | Mask.CLOSE_WRITE | Mask.CREATE | Mask.MOVE_SELF | Mask.ONLYDIR

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        # Name -> identity of the file last yielded under it.
        self._yielded: dict[str, tuple[int, int, int]] = {}
        # Size at which names no longer in the spool are forgotten.
        self._prune_at = 4096

    def __aiter__(self) -> AsyncGenerator[Path, None]:
        return self.watch()

    def _fresh(self, name: str, st: os.stat_result) -> bool:
        """Record `name` as yielded; False when this very file was yielded already."""
        identity = (st.st_dev, st.st_ino, st.st_ctime_ns)
        if self._yielded.get(name) == identity:
            return False
        if len(self._yielded) >= self._prune_at:
            self._prune()
        self._yielded[name] = identity
        return True

    def _prune(self) -> None:
        for name in list(self._yielded):
            if not os.path.lexists(self.spool_dir / name):
                del self._yielded[name]
        self._prune_at = max(4096, 2 * len(self._yielded))

    def _candidate(self, name: str, mask: Mask) -> Path | None:
        if not is_request_name(name):
            return None
        try:
            st = os.lstat(os.path.join(self.spool_dir, name))
        except OSError:
            self._yielded.pop(name, None)
            return None
        # A regular file just created is still being written: its CLOSE_WRITE will come.
        # Unless it is a hard link (nlink > 1): then no CLOSE_WRITE follows.
        if Mask.CREATE in mask and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return None
        return self.spool_dir / name if self._fresh(name, st) else None

    def rescan(self) -> list[Path]:
        """Pending requests not yielded yet, oldest first."""
        fresh: list[Path] = []
        for path in list_pending(self.spool_dir):
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if self._fresh(path.name, st):
                fresh.append(path)
        return fresh

    async def watch(self) -> AsyncGenerator[Path, None]:
        """The async generator behind `async for path in SpoolWatcher(dir)`.

        Raises OSError when the spool directory itself is removed or moved away. Close it
        (`contextlib.aclosing`) to release the inotify descriptor promptly.
        """
        with Inotify(cache_size=256) as inotify:
            inotify.add_watch(self.spool_dir, self.MASK)
            for path in self.rescan():
                yield path
            async for event in inotify:
                if Mask.Q_OVERFLOW in event.mask:
                    log.info("spool_queue_overflow", spool=str(self.spool_dir))
                    for path in self.rescan():
                        yield path
                    continue
                if Mask.IGNORED in event.mask or Mask.MOVE_SELF in event.mask:
                    raise OSError(
                        errno.ENOENT, "spool directory removed or moved", str(self.spool_dir)
                    )
                if event.name is None:
                    continue
                candidate = self._candidate(str(event.name), event.mask)
                if candidate is not None:
                    yield candidate


def watch(spool_dir: Path) -> AsyncGenerator[Path, None]:
    """`SpoolWatcher(spool_dir).watch()`."""
    return SpoolWatcher(spool_dir).watch()
