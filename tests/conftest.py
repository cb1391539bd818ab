"""Test session setup: run the whole session in a private mount namespace when we are root.

As root, the first thing pytest does here is re-exec itself, with the same interpreter and
command line, under `unshare -m --propagation private` with `PERSONALITYD_TEST_NS=1` set. Every
mount a test or a daemon it starts makes then lives in that namespace and dies with it, even if
cleanup fails; nothing leaks into the host's mount table. Loop devices, udev and the journal
stay global: the integration fixtures clean those up by name and PID.

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

import pytest

from testkit.namespace import reexec_unshared

NAMESPACE_ENV = "PERSONALITYD_TEST_NS"

_REEXEC = os.geteuid() == 0 and NAMESPACE_ENV not in os.environ


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _REEXEC:
        return
    reexec_unshared([sys.executable, "-m", "pytest", *sys.argv[1:]], NAMESPACE_ENV)


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
