"""Spool requests (docs/spool.md): dropping them, waiting for results, counting answers.

A request is written as a dotfile and renamed in as `<name>.json`; the daemon answers with
`done/<name>.result.json` or `failed/<name>.result.json`. Clients wait for the answer with
inotify on done/ and failed/ (`ResultWatch`), so they sleep instead of polling: a polling
client takes CPU from the daemon it measures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

from testkit.contract import DEFAULT_PATHS, RESULT_DIRS

# While a result dir is missing (the daemon not started yet), look again this often.
_UNWATCHED_POLL = 0.05


def new_name(prefix: str = "req") -> str:
    """A fresh request name: `<prefix>-<12 hex digits>`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def drop(spool: Path, name: str, body: Mapping[str, Any] | str | bytes) -> None:
    """Write a request as a dotfile, then rename it in as `<name>.json` (docs/spool.md).

    `body` may be raw str/bytes to send malformed requests.
    """
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    tmp = spool / f".tmp-{name}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.rename(spool / f"{name}.json")


class ResultWatch:
    """inotify on `done/` and `failed/` of a spool: `wait()` returns when something lands.

    Synchronous use of asyncinotify (`sync_get` with a timeout). A result dir that does not
    exist yet is watched as soon as it does; until then, and when no inotify instance can be
    had, `wait()` falls back to short sleeps.
    """

    MASK = Mask.MOVED_TO | Mask.CLOSE_WRITE

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self._watched: set[str] = set()
        try:
            self._inotify: Inotify | None = Inotify(sync_timeout=0)
        except OSError:  # out of inotify instances (fs.inotify.max_user_instances)
            self._inotify = None
        self._add_watches()

    def __enter__(self) -> ResultWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_watches(self) -> bool:
        """Watch the result dirs not watched yet; True when all of them are."""
        if self._inotify is None:
            return False
        for where in RESULT_DIRS:
            if where in self._watched:
                continue
            try:
                self._inotify.add_watch(self.spool / where, self.MASK)
            except OSError:
                continue  # not there yet
            self._watched.add(where)
        return len(self._watched) == len(RESULT_DIRS)

    def wait(self, timeout: float) -> None:
        """Sleep until a file lands in a result dir or `timeout` s pass; drain the events."""
        if not self._add_watches():
            timeout = min(timeout, _UNWATCHED_POLL)
        if self._inotify is None or not self._watched:
            time.sleep(max(0.0, timeout))
            return
        self._inotify.sync_timeout = max(0.0, timeout)
        if self._inotify.sync_get() is None:
            return
        self._inotify.sync_timeout = 0
        while self._inotify.sync_get() is not None:
            pass

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def find_result(spool: Path, name: str) -> dict[str, Any] | None:
    """The parsed result of request `name`, with `"_dir"`: `"done"` or `"failed"`; or None."""
    for where in RESULT_DIRS:
        path = spool / where / f"{name}.result.json"
        try:
            result: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except ValueError:  # JSON or UTF-8: being written; the daemon renames it in, be tolerant
            continue
        result["_dir"] = where
        return result
    return None


def wait_result(
    spool: Path,
    name: str,
    timeout: float = 30,
    *,
    watch: ResultWatch | None = None,
    moved: bool = True,
) -> dict[str, Any]:
    """Wait for the result of request `name` (see `find_result`); AssertionError on timeout.

    The daemon writes the result, then moves the request beside it: by default this also
    waits until `<name>.json` has left the spool, so that a caller sees the request answered
    as a whole; `moved=False` returns as soon as the result file is there. Pass a `watch` to
    reuse one inotify instance over many requests; else one is made here.
    """
    own = watch is None
    active = ResultWatch(spool) if watch is None else watch
    try:
        deadline = time.monotonic() + timeout
        while True:
            result = find_result(spool, name)
            if result is not None and not (moved and (spool / f"{name}.json").exists()):
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                listing = sorted(str(p.relative_to(spool)) for p in spool.rglob("*"))
                raise AssertionError(
                    f"no result for spool request {name} after {timeout} s: {listing[:50]}"
                )
            active.wait(min(remaining, 0.5))
    finally:
        if own:
            active.close()


def spool_request(
    root: Path,
    body: Mapping[str, Any] | str | bytes,
    name: str | None = None,
    timeout: float = 30,
    *,
    spool_dir: Path | None = None,
) -> dict[str, Any]:
    """Submit one spool request and wait for its result.

    Drops `<name>.json` (see `drop`), waits for `<spool>/done/<name>.result.json` or
    `<spool>/failed/<name>.result.json`, and returns the parsed result with one extra key,
    `"_dir"`: `"done"` or `"failed"`. The spool defaults to `root/var/spool/personalityd`.
    """
    spool = spool_dir if spool_dir is not None else root / DEFAULT_PATHS["spool"].lstrip("/")
    name = name or new_name()
    with ResultWatch(spool) as watch:
        drop(spool, name, body)
        return wait_result(spool, name, timeout, watch=watch)


# -- many requests: every one answered exactly once --------------------------------------------


def results(spool: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Request stem -> [(dir, result)] over done/ and failed/."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for where in RESULT_DIRS:
        for path in (spool / where).glob("*.result.json"):
            stem = path.name[: -len(".result.json")]
            found.setdefault(stem, []).append((where, json.loads(path.read_text())))
    return found


def wait_answered(spool: Path, stems: Iterable[str], timeout: float = 120) -> None:
    """Wait until every request in `stems` has at least one result."""
    wanted = set(stems)
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - set(results(spool))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} requests unanswered, e.g. {sorted(missing)[:5]}")
        time.sleep(0.1)


def spool_answers(spool: Path, stems: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Assert each request was answered exactly once; return stem -> result.

    One result, in done/ when ok and failed/ otherwise; the request itself moved beside it;
    no request left in the spool.
    """
    found = results(spool)
    answers = {}
    for stem in stems:
        got = found.get(stem, [])
        assert len(got) == 1, f"request {stem} answered {len(got)} times: {got}"
        where, result = got[0]
        assert (result["status"] == "ok") == (where == "done"), (stem, where, result)
        assert not (spool / f"{stem}.json").exists(), f"{stem}.json still in the spool"
        answers[stem] = result
    leftovers = [p.name for p in spool.glob("*.json")]
    assert not leftovers, f"requests left in the spool: {leftovers[:10]}"
    return answers
