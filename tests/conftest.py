"""Test session setup: run the whole session in private mount and network namespaces as root.

As root, the first thing pytest does here is re-exec itself, with the same interpreter and
command line, under `unshare -m -n --propagation private` with `PERSONALITYD_TEST_NS=1` set.
Every mount a test or a daemon it starts makes then lives in that namespace and dies with it,
even if cleanup fails; nothing leaks into the host's mount table. The network namespace holds
the session's own udevd and its event multicast (`testkit/testkit/udevd.py`), apart
from any udevd the machine runs. Loop devices and the journal stay global: the integration
fixtures clean those up by name and PID.

The system tests keep the host's network (debootstrap fetches packages; nspawn gives the
container a network of its own anyway): with `PERSONALITYD_SYSTEM_TEST=1`, or a path under
tests/system on the command line, the re-exec leaves out `-n`.

The decision is taken at import time; the exec itself happens in the earliest
`pytest_configure` rather than during the import, because pytest imports this file while its
fd-level output capture is active: an exec at that moment would send the whole re-run's
output into pytest's capture file. By `pytest_configure` the real stdout/stderr are back.

Not root: no re-exec. Unit tests run as usual; integration tests fail (not skip) with a message
saying why (see `tests/integration/conftest.py`).

With `CI=true` in the environment a skipped test is reported as a failure: CI must never pass
because something quietly did not run. (Expected failures, `xfail`, are left alone.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

NAMESPACE_ENV = "PERSONALITYD_TEST_NS"
OUTER_NETNS_ENV = "PERSONALITYD_TEST_OUTER_NETNS"

SYSTEM_TESTS = Path(__file__).resolve().parent / "system"

_REEXEC = os.geteuid() == 0 and NAMESPACE_ENV not in os.environ


def _system_tests_requested(config: pytest.Config) -> bool:
    if os.environ.get("PERSONALITYD_SYSTEM_TEST") == "1":
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        if path == SYSTEM_TESTS or SYSTEM_TESTS in path.parents:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _REEXEC:
        return
    os.environ[NAMESPACE_ENV] = "1"
    # What the session's network namespace is compared with where /proc/1/ns is out of reach.
    os.environ[OUTER_NETNS_ENV] = os.readlink("/proc/self/ns/net")
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "pytest", *sys.argv[1:]]
    namespaces = ["-m"] if _system_tests_requested(config) else ["-m", "-n"]
    os.execvp("unshare", ["unshare", *namespaces, "--propagation", "private", "--", *argv])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"
    return report
