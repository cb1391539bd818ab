"""The spool watcher on a real directory (inotify): requests present at start, then arriving ones,
each once, bursts, queue overflow, the directory going away."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
from spool_files import BODY, drop
from structlog.testing import capture_logs

from personalityd.adapters.spool import SpoolWatcher

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def watching(spool_dir: Path) -> AsyncIterator[AsyncGenerator[Path, None]]:
    async with contextlib.aclosing(SpoolWatcher(spool_dir).watch()) as paths:
        yield paths


async def take(paths: AsyncIterator[Path], count: int, timeout: float = 60) -> list[Path]:
    seen: list[Path] = []
    async with asyncio.timeout(timeout):
        while len(seen) < count:
            seen.append(await anext(paths))
    return seen


async def assert_nothing_more(paths: AsyncIterator[Path], wait: float = 0.5) -> None:
    """Nothing else is yielded within `wait` (ends the generator: use last)."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(wait):
            extra = await anext(paths)
            pytest.fail(f"unexpected {extra}")


async def test_watcher_yields_present_then_arriving(spool_dir: Path) -> None:
    first = drop(spool_dir, "first.json")
    os.utime(first, ns=(1_000_000_000, 1_000_000_000))
    second = drop(spool_dir, "second.json")
    async with watching(spool_dir) as paths:
        assert await take(paths, 2) == [first, second]
        # Not requests: a dotfile, a result file, another suffix.
        (spool_dir / ".tmp.json").write_bytes(BODY)
        (spool_dir / "x.result.json").write_bytes(BODY)
        (spool_dir / "notes.txt").write_bytes(BODY)
        renamed = drop(spool_dir, "renamed.json")
        assert await take(paths, 1) == [renamed]
        # Written in place: yielded once it is closed, not when created.
        with open(spool_dir / "inplace.json", "wb") as f:
            f.write(b'{"action":')
            f.flush()
            pending = asyncio.ensure_future(anext(paths))
            await asyncio.sleep(0.3)
            assert not pending.done(), "yielded while still being written"
            f.write(b' "detach", "personality": "web"}')
        assert await asyncio.wait_for(pending, 60) == spool_dir / "inplace.json"
        # Kinds that never get CLOSE_WRITE are yielded on creation, to be refused.
        os.symlink("/etc/shadow", spool_dir / "link.json")
        assert await take(paths, 1) == [spool_dir / "link.json"]
        os.mkfifo(spool_dir / "fifo.json")
        assert await take(paths, 1) == [spool_dir / "fifo.json"]
        os.link(renamed, spool_dir / "hardlink.json")
        assert await take(paths, 1) == [spool_dir / "hardlink.json"]
        # The same name again after the first was handled: a new request.
        os.rename(renamed, spool_dir / "done" / "renamed.json")
        again = drop(spool_dir, "renamed.json", b"{}")
        assert await take(paths, 1) == [again]
        await assert_nothing_more(paths)


async def test_watcher_burst_of_renames_seen_exactly_once(spool_dir: Path) -> None:
    count = 2000
    present = [drop(spool_dir, f"old-{i:05d}.json") for i in range(50)]

    def submit() -> list[Path]:
        return [drop(spool_dir, f"new-{i:05d}.json") for i in range(count)]

    async with watching(spool_dir) as paths:
        submitter = asyncio.create_task(asyncio.to_thread(submit))
        seen = await take(paths, count + len(present))
        submitted = await submitter
        assert len(seen) == len(set(seen))
        assert set(seen) == set(present) | set(submitted)
        await assert_nothing_more(paths)


async def test_watcher_queue_overflow_rescans(spool_dir: Path) -> None:
    """10,000 files written in place while the consumer is busy: the inotify queue overflows
    (two events per file, 16,384 queued at most), the watcher lists the directory again."""
    count = 10_000
    start = drop(spool_dir, "start.json")
    with capture_logs() as logs:
        async with watching(spool_dir) as paths:
            assert await take(paths, 1) == [start]  # the watch is on; nothing is read now
            names = [f"burst-{i:05d}.json" for i in range(count)]
            for name in names:
                (spool_dir / name).write_bytes(BODY)
            seen = await take(paths, count, timeout=60)
            assert len(seen) == len(set(seen))
            assert {p.name for p in seen} == set(names)
            await assert_nothing_more(paths)
    assert any(e["event"] == "spool_queue_overflow" for e in logs)


async def test_watcher_raises_when_spool_removed(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    first = drop(spool_dir, "a.json")
    async with watching(spool_dir) as paths:
        assert await take(paths, 1) == [first]
        os.rename(spool_dir, tmp_path / "moved")
        with pytest.raises(OSError, match="spool directory removed or moved"):
            await take(paths, 1, timeout=60)
