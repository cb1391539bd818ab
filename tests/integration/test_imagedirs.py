"""adapters/imagedirs.py on real trees: what the search paths offer (precedence, duplicates,
refusals) and the watcher telling when that changes (inotify on the real directories)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import pytest
from image_entries import mkdirs, write
from structlog.testing import capture_logs

from personalityd.adapters.imagedirs import (
    FoundEntry,
    RefusedEntry,
    ScanResult,
    SearchPathWatcher,
    scan_search_paths,
)

pytestmark = pytest.mark.integration

SEARCH_PATHS = (
    "/etc/personalities",
    "/run/personalities",
    "/var/lib/personalities",
    "/usr/lib/personalities",
)
USER = 1000


def file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = mkdirs(tmp_path / "root")
    for directory in ("etc/personalities", "run", "var/lib/personalities", "usr/lib"):
        mkdirs(root / directory)
    for directory in ("etc", "var", "var/lib", "usr"):
        os.chmod(root / directory, 0o755)
    return root


def scan(root: Path, views: dict[str, str] | None = None) -> ScanResult:
    return scan_search_paths(str(root), SEARCH_PATHS, views or {})


def names(result: ScanResult) -> dict[str, str]:
    return {entry.name: entry.path for entry in result.entries}


def test_entries_of_every_kind(root: Path) -> None:
    var = root / "var/lib/personalities"
    write(var / "web_1.2.raw")
    (var / "web.raw").symlink_to("web_1.2.raw")
    write(var / "db.squashfs")
    mkdirs(var / "dev-tree/usr")
    write(var / ".web.raw.partial")
    write(var / "README")
    result = scan(root)
    db, tree, web = (f"{var}/db.squashfs", f"{var}/dev-tree", f"{var}/web_1.2.raw")
    assert result.entries == [
        FoundEntry("db", db, "file", 2, db, file_id(var / "db.squashfs")),
        FoundEntry("dev-tree", tree, "dir", 2, tree, file_id(var / "dev-tree")),
        FoundEntry("web", f"{var}/web.raw", "symlink", 2, web, file_id(var / "web_1.2.raw")),
    ]
    assert result.refused == []
    assert result.duplicates == []


def test_missing_search_directories_offer_nothing(root: Path) -> None:
    assert scan(root) == ScanResult()


def test_first_search_path_wins_and_the_others_are_duplicates(root: Path) -> None:
    etc = root / "etc/personalities"
    var = root / "var/lib/personalities"
    usr = root / "usr/lib/personalities"
    write(usr / "web.raw")
    write(var / "web.squashfs")
    write(etc / "web.raw")
    write(usr / "db.raw")
    result = scan(root)
    assert names(result) == {"db": f"{usr}/db.raw", "web": f"{etc}/web.raw"}
    web = result.entries[1]
    assert web.rank == 0
    assert [(loser.path, loser.rank, winner.path) for loser, winner in result.duplicates] == [
        (f"{var}/web.squashfs", 2, f"{etc}/web.raw"),
        (f"{usr}/web.raw", 3, f"{etc}/web.raw"),
    ]


def test_same_name_twice_in_one_directory(root: Path) -> None:
    var = root / "var/lib/personalities"
    write(var / "web.squashfs")
    write(var / "web.raw")
    result = scan(root)
    assert names(result) == {"web": f"{var}/web.raw"}
    [(loser, winner)] = result.duplicates
    assert (loser.path, winner.path) == (f"{var}/web.squashfs", f"{var}/web.raw")


def test_untrusted_entries_are_refused_and_give_way(root: Path) -> None:
    etc = root / "etc/personalities"
    var = root / "var/lib/personalities"
    os.chown(write(etc / "web.raw"), USER, USER)
    write(var / "web.raw")
    write(var / "open.raw", mode=0o666)
    (var / "link.raw").symlink_to("open.raw")
    os.mkfifo(var / "pipe.raw", 0o644)
    result = scan(root)
    assert names(result) == {"web": f"{var}/web.raw"}
    assert result.refused == [
        RefusedEntry(f"{etc}/web.raw", f"{etc}/web.raw is owned by uid 1000, not root", "web"),
        # open.raw is link.raw's content (sysupdate layout), not an entry of its own.
        RefusedEntry(
            f"{var}/link.raw", f"{var}/open.raw is writable by others (mode 0666)", "link"
        ),
        RefusedEntry(f"{var}/pipe.raw", f"{var}/pipe.raw is a FIFO, not a regular file", "pipe"),
    ]
    assert result.duplicates == []


def test_dangling_and_looping_symlinks_are_refused(root: Path) -> None:
    var = root / "var/lib/personalities"
    (var / "gone.raw").symlink_to("gone_1.raw")
    (var / "a.raw").symlink_to("b.raw")
    (var / "b.raw").symlink_to("a.raw")
    result = scan(root)
    assert result.entries == []
    assert [(r.name, r.reason) for r in result.refused] == [
        ("a", f"{var}/a.raw: Too many levels of symbolic links (more than 40)"),
        ("b", f"{var}/b.raw: Too many levels of symbolic links (more than 40)"),
        ("gone", f"{var}/gone_1.raw: No such file or directory"),
    ]


def test_untrusted_search_directory_is_refused_whole(root: Path) -> None:
    var = root / "var/lib/personalities"
    write(var / "web.raw")
    os.chmod(var, 0o1777)
    write(root / "usr/lib/personalities/web.raw")
    result = scan(root)
    assert names(result) == {"web": f"{root}/usr/lib/personalities/web.raw"}
    assert result.refused == [RefusedEntry(str(var), f"{var} is writable by others (mode 1777)")]


def test_search_path_that_is_a_file(root: Path) -> None:
    write(root / "run/personalities")
    assert scan(root).refused == [
        RefusedEntry(
            f"{root}/run/personalities",
            f"{root}/run/personalities is a regular file, not a directory",
        )
    ]


def test_two_search_paths_for_one_directory_count_once(root: Path) -> None:
    os.symlink("../var/lib/personalities", root / "run/personalities")
    write(root / "var/lib/personalities/web.raw")
    result = scan(root)
    assert names(result) == {"web": f"{root}/var/lib/personalities/web.raw"}
    assert result.entries[0].rank == 1  # found through /run/personalities first
    assert result.duplicates == []


def test_views_are_read_instead_of_stacked_hierarchies(root: Path, tmp_path: Path) -> None:
    base = mkdirs(tmp_path / "base-usr")
    write(base / "lib/personalities/web.raw", b"base")
    write(root / "usr/lib/personalities/evil.raw", b"from a personality")
    write(root / "usr/lib/personalities/web.raw", b"from a personality")
    result = scan(root, {"/usr": str(base)})
    [web] = result.entries
    assert web.path == f"{root}/usr/lib/personalities/web.raw"
    assert web.file_id == file_id(base / "lib/personalities/web.raw")


def test_symlink_entry_into_a_view(root: Path, tmp_path: Path) -> None:
    base = mkdirs(tmp_path / "base-usr")
    write(base / "share/images/web_3.raw", b"base")
    write(root / "usr/share/images/web_3.raw", b"stacked")
    (root / "etc/personalities/web.raw").symlink_to("/usr/share/images/web_3.raw")
    [web] = scan(root, {"/usr": str(base)}).entries
    assert (web.kind, web.target) == ("symlink", f"{root}/usr/share/images/web_3.raw")
    assert web.file_id == file_id(base / "share/images/web_3.raw")


# -- the watcher -------------------------------------------------------------------------


class Changes:
    """The watcher's `changes()` read by a task of its own into a queue, so a test can wait
    for the next change with a timeout (a timeout inside the generator would end it)."""

    def __init__(self, watcher: SearchPathWatcher) -> None:
        self.queue: asyncio.Queue[None] = asyncio.Queue()
        self.task = asyncio.create_task(self._read(watcher.changes()))

    async def _read(self, changes: AsyncGenerator[None, None]) -> None:
        async with contextlib.aclosing(changes):
            async for _ in changes:
                self.queue.put_nowait(None)

    async def next(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            await self.queue.get()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def watching(
    root: Path, views: dict[str, str] | None = None
) -> AsyncIterator[tuple[SearchPathWatcher, Changes]]:
    with SearchPathWatcher(str(root), SEARCH_PATHS, views or {}) as watcher:
        changes = Changes(watcher)
        try:
            yield watcher, changes
        finally:
            await changes.stop()


async def quiet(changes: Changes, wait: float = 0.5) -> None:
    """Let earlier changes be told, until none comes for `wait` seconds."""
    while True:
        try:
            await changes.next(wait)
        except TimeoutError:
            return


async def assert_quiet(changes: Changes, wait: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await changes.next(wait)
        pytest.fail("a change was told")


async def after_change(
    changes: Changes, root: Path, check: Callable[[ScanResult], bool],
    views: dict[str, str] | None = None, timeout: float = 60,
) -> ScanResult:  # fmt: skip
    """Wait for the watcher to tell a change after which a scan passes `check` (a burst may
    be told in more than one piece on a loaded machine)."""
    async with asyncio.timeout(timeout):
        while True:
            await changes.next()
            result = scan(root, views)
            if check(result):
                return result


async def test_entries_appear_change_and_disappear(root: Path) -> None:
    var = root / "var/lib/personalities"
    async with watching(root) as (_, changes):
        assert scan(root).entries == []
        write(var / "web.raw", b"one")
        result = await after_change(changes, root, lambda r: "web" in names(r))
        first = result.entries[0].file_id
        await quiet(changes)
        # A new version renamed over the entry: same path, another file.
        write(var / ".web.raw.new", b"two")
        os.rename(var / ".web.raw.new", var / "web.raw")
        await after_change(changes, root, lambda r: r.entries[0].file_id != first)
        await quiet(changes)
        # The sysupdate way: a new file, then the symlink moved to it.
        write(var / "db_2.raw")
        (var / ".db.raw.tmp").symlink_to("db_2.raw")
        os.rename(var / ".db.raw.tmp", var / "db.raw")
        result = await after_change(changes, root, lambda r: "db" in names(r))
        assert result.entries[0].target == f"{var}/db_2.raw"
        await quiet(changes)
        os.unlink(var / "web.raw")
        await after_change(changes, root, lambda r: "web" not in names(r))
        await quiet(changes)
        # Moved away (to another directory): gone as well.
        os.rename(var / "db_2.raw", root / "db_2.raw")
        await after_change(changes, root, lambda r: any(x.name == "db" for x in r.refused))
        await quiet(changes)
        # A scan touches nothing the watcher reports (no feedback loop).
        scan(root)
        await assert_quiet(changes)


async def test_chmod_and_chown_change_the_verdict(root: Path) -> None:
    var = root / "var/lib/personalities"
    image = write(var / "web.raw")
    async with watching(root) as (_, changes):
        os.chmod(image, 0o666)
        await after_change(changes, root, lambda r: [x.name for x in r.refused] == ["web"])
        await quiet(changes)
        os.chmod(image, 0o644)
        await after_change(changes, root, lambda r: "web" in names(r))
        await quiet(changes)
        os.chown(image, USER, 0)
        await after_change(changes, root, lambda r: "web" not in names(r))
        await quiet(changes)
        os.chown(image, 0, 0)
        await after_change(changes, root, lambda r: "web" in names(r))
        await quiet(changes)
        # A directory on the way to the search directory.
        os.chmod(root / "var", 0o777)
        await after_change(changes, root, lambda r: r.entries == [] and len(r.refused) == 1)
        await quiet(changes)
        os.chmod(root / "var", 0o755)
        await after_change(changes, root, lambda r: "web" in names(r))


async def test_missing_search_directory_created_later_then_populated(root: Path) -> None:
    async with watching(root) as (watcher, changes):
        before = watcher.watched
        (root / "run/personalities").mkdir()
        await after_change(changes, root, lambda r: True)
        assert watcher.watched == before + 1
        await quiet(changes)
        write(root / "run/personalities/web.raw")
        await after_change(changes, root, lambda r: "web" in names(r))
        await quiet(changes)
        # Deeper: /usr/lib/personalities and /usr/lib as well, made at once.
        (root / "usr/lib").rmdir()
        await quiet(changes)
        mkdirs(root / "usr/lib")
        mkdirs(root / "usr/lib/personalities")
        write(root / "usr/lib/personalities/db.raw")
        await after_change(changes, root, lambda r: "db" in names(r))
        await quiet(changes)
        # Removed and made again: watched again.
        os.unlink(root / "run/personalities/web.raw")
        (root / "run/personalities").rmdir()
        await after_change(changes, root, lambda r: "web" not in names(r))
        await quiet(changes)
        mkdirs(root / "run/personalities")
        await quiet(changes)
        write(root / "run/personalities/web.raw")
        await after_change(changes, root, lambda r: "web" in names(r))


async def test_search_directory_behind_a_symlink_that_moves(root: Path) -> None:
    mkdirs(root / "srv")
    first = mkdirs(root / "srv/one")
    second = mkdirs(root / "srv/two")
    write(second / "web.raw")
    os.symlink("../srv/one", root / "run/personalities")
    async with watching(root) as (_, changes):
        write(first / "db.raw")
        await after_change(changes, root, lambda r: "db" in names(r))
        await quiet(changes)
        os.symlink("../srv/two", root / "run/.personalities.new")
        os.rename(root / "run/.personalities.new", root / "run/personalities")
        await after_change(changes, root, lambda r: set(names(r)) == {"web"})
        await quiet(changes)
        # The directory now watched is the new one.
        write(second / "more.raw")
        await after_change(changes, root, lambda r: "more" in names(r))
        await quiet(changes)
        write(first / "old.raw")
        await assert_quiet(changes)


async def test_view_redirected_directory_is_watched_not_the_stack(
    root: Path, tmp_path: Path
) -> None:
    base = mkdirs(tmp_path / "base-usr")
    mkdirs(base / "lib/personalities")
    stacked = mkdirs(root / "usr/lib/personalities")
    views = {"/usr": str(base)}
    async with watching(root, views) as (_, changes):
        write(stacked / "evil.raw")
        await assert_quiet(changes)
        write(base / "lib/personalities/web.raw")
        result = await after_change(changes, root, lambda r: "web" in names(r), views)
        assert names(result) == {"web": f"{root}/usr/lib/personalities/web.raw"}


async def test_queue_overflow_is_a_change_and_watching_goes_on(root: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    var = root / "var/lib/personalities"
    async with watching(root) as (_, changes):
        # Nothing reads events while this loop runs (one event loop): the queue overflows.
        for i in range(limit // 2 + 10):
            write(var / f".tmp{i}", b"")
        with capture_logs() as logs:
            await changes.next()
        assert "search_path_queue_overflow" in [entry["event"] for entry in logs]
        await quiet(changes)
        write(var / "web.raw")
        await after_change(changes, root, lambda r: "web" in names(r))


def test_watcher_without_any_search_directory(root: Path) -> None:
    with SearchPathWatcher(str(root), ()) as watcher:
        assert watcher.watched == 0
