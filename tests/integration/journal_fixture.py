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
from collections.abc import Iterator
from typing import Any

import pytest

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


@contextlib.contextmanager
def running_journald(timeout: float = 10.0) -> Iterator[int | None]:
    """Yield the PID of the journald started here, or None when one was already listening."""
    if journal_listening():
        yield None
        return
    if not os.access(JOURNALD, os.X_OK):
        pytest.skip(f"{JOURNALD} is not installed")
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
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def journald() -> Iterator[int | None]:
    """A journald listening on the system journal socket for the whole session."""
    with running_journald() as pid:
        yield pid


def read_journal(*matches: str, timeout: float = 5.0, expect: int = 1) -> list[dict[str, Any]]:
    """Entries matching `FIELD=value` matches, as `journalctl -o json` gives them.

    Retries until at least `expect` entries are there or `timeout` passes: journald writes
    asynchronously. Repeated fields come back as JSON lists, in the order they were sent.
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
