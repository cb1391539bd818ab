"""A running systemd-journald for tests, and reading entries back with journalctl.

There is no systemd as PID 1 on the test machines, so journald is started by hand when
nothing listens on its socket. Only a journald started here is stopped afterwards, by its
PID; one that was already running is used as it is. Without a flush request journald keeps
its files in /run/log/journal, which `journalctl` reads like any other journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from testkit.processes import stop_process

JOURNALD = "/usr/lib/systemd/systemd-journald"
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def journal_listening(path: str = JOURNAL_SOCKET) -> bool:
    """True when something accepts datagrams on the journal socket (not just a stale file)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def journald_available() -> bool:
    """A journald listens already, or one can be started here."""
    return journal_listening() or os.access(JOURNALD, os.X_OK)


@contextlib.contextmanager
def running_journald(timeout: float = 10.0) -> Iterator[int | None]:
    """Yield the PID of the journald started here, or None when one was already listening."""
    if journal_listening():
        yield None
        return
    if not os.access(JOURNALD, os.X_OK):
        raise RuntimeError(f"{JOURNALD} is not installed")
    proc = subprocess.Popen(
        [JOURNALD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not journal_listening():
            if proc.poll() is not None:
                raise RuntimeError(f"{JOURNALD} exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{JOURNALD} did not open {JOURNAL_SOCKET} in {timeout} s")
            time.sleep(0.05)
        yield proc.pid
    finally:
        stop_process(proc, timeout=10)


def read_journal(*matches: str, timeout: float = 60.0, expect: int = 1) -> list[dict[str, Any]]:
    """Entries matching `FIELD=value` matches, as `journalctl -o json` gives them.

    Retries until at least `expect` entries are there or `timeout` passes: journald writes
    asynchronously, and on a loaded machine it can take seconds. Repeated fields come back
    as JSON lists, in the order they were sent.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", *matches],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        entries = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if len(entries) >= expect or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def journal_entries(
    message_id: str,
    *,
    since: float | None = None,
    min_count: int = 1,
    timeout: float = 60.0,
    **match: str | int,
) -> list[dict[str, Any]]:
    """Journal entries with MESSAGE_ID and all `match` fields (FIELD=value), oldest first.

    Runs `journalctl --no-pager -o json [--since=@EPOCH] MESSAGE_ID=... FIELD=value ...` (via
    `read_journal`) until at least `min_count` entries are there or `timeout` seconds have
    passed, then returns what it found (possibly fewer; pass `min_count=0` to check for
    absence without waiting). Entries are readable as soon as journald has them; no
    `journalctl --sync`/`--flush` is needed. Repeated fields (e.g. PERSONALITY_SHADOWED) come
    back as lists in the order sent, single ones as strings.
    """
    args = [] if since is None else [f"--since=@{since:.6f}"]
    args.append(f"MESSAGE_ID={message_id}")
    args += [f"{key}={value}" for key, value in match.items()]
    return read_journal(*args, timeout=timeout, expect=min_count)


def field_list(entry: Mapping[str, Any], key: str) -> list[str]:
    """A journal field as a list, whether journalctl printed it once (str) or repeated (list)."""
    value = entry.get(key)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass
class JournalReader:
    """`journal_entries` limited to entries written since `since` (default: when created)."""

    since: float = field(default_factory=lambda: time.time() - 0.001)

    def entries(
        self, message_id: str, *, min_count: int = 1, timeout: float = 60.0, **match: str | int
    ) -> list[dict[str, Any]]:
        return journal_entries(
            message_id, since=self.since, min_count=min_count, timeout=timeout, **match
        )
