"""Fixtures for the fault and load suite: those of tests/integration, plus a few of its own.

`make stress` runs `pytest -o python_files='stress_*.py' tests/stress` (so `make test` never
collects these). The integration fixtures (real udevd, journald, loop devices tagged for this
session, sandbox root, daemon factory) are loaded from tests/integration/conftest.py under a
module name of their own; the helpers come from the `testkit` package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

INTEGRATION = Path(__file__).resolve().parent.parent / "integration"
# Its conftest imports helper modules beside it (served_daemon, ...), as pytest would find them.
if str(INTEGRATION) not in sys.path:
    sys.path.append(str(INTEGRATION))

_spec = importlib.util.spec_from_file_location(
    "personalityd_integration_conftest", INTEGRATION / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _integration
_spec.loader.exec_module(_integration)

# Fixtures and the report hook, re-exported so pytest registers them for tests/stress.
_integration_preconditions = _integration._integration_preconditions
udevd = _integration.udevd
journald = _integration.journald
udev_token = _integration.udev_token
journal = _integration.journal
loop_devices = _integration.loop_devices
sandbox_root = _integration.sandbox_root
daemon_factory = _integration.daemon_factory
daemon = _integration.daemon
udev_monitor = _integration.udev_monitor
pytest_runtest_makereport = _integration.pytest_runtest_makereport
