"""Fixtures for the integration tests: real udevd, journald, loop devices, the daemon.

The helpers themselves live in testkit (and the modules beside this file); this file wires
them into fixtures that always clean up after themselves, also on failure.

| fixture | scope | gives |
|---|---|---|
| `udevd` | session | `PrivateUdevd`: the session's own udevd (`testkit.udevd`); `.restart()` |
| `journald` | session | PID of the journald started (`journal_fixture`), or None if running |
| `udev_token` | session | token set as `PERSONALITYD_TEST` on this session's loop devices |
| `journal` | function | `JournalReader` limited to entries written since the test started |
| `loop_devices` | function | `LoopDevices`: `attach`, `detach`, `yank`; detaches the rest after |
| `sandbox_root` | function | `Path` of a minimal base OS tree; unmounts everything in it after |
| `spool_dir` | function | an empty spool directory (`ensure_spool_dirs`), for the adapter tests |
| `image` | function | `image(name, files, fmt="squashfs", **kw)`: `build_image` into `tmp_path` |
| `daemon_factory` | function | `make(root=None, *, config=None, env=None, name=...) -> Daemon` |
| `daemon` | function | a `Daemon` on `sandbox_root`, configured but not started |
| `udev_monitor` | function | a running `UdevMonitor` on block devices |
| `system_bus` | module | address of a private dbus-daemon with the system bus policy and ours |
| `serve` | function | `serve(daemon)`: the daemon started on that bus, once it owns the name |
| `client` | function | a dbus-fast connection to that bus, for calls |

When a test fails, the log of every daemon it started is attached to the report.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus
from served_daemon import Serve, connection, serve_on

from personalityd.adapters.spool import ensure_spool_dirs
from testkit.daemon import Daemon
from testkit.dbus import private_system_bus
from testkit.images import build_image
from testkit.journal import JournalReader, running_journald
from testkit.loops import LoopDevices
from testkit.mounts import unmount_tree
from testkit.sandbox import make_sandbox_root
from testkit.udev import UdevMonitor, udev_tag_rule
from testkit.udevd import PrivateUdevd, private_udevd
from testkit.users import MemberUser, ensure_group, temporary_member

NAMESPACE_ENV = "PERSONALITYD_TEST_NS"
DAEMONS_KEY = pytest.StashKey[list[Daemon]]()


def _in_private_mount_namespace() -> bool:
    if os.environ.get(NAMESPACE_ENV) != "1":
        return False
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return True  # PID 1's namespace is not visible to us: trust the marker


@pytest.fixture(scope="session", autouse=True)
def _integration_preconditions() -> None:
    """Fail (never skip) every integration test that cannot run for real.

    Session-scoped so that it runs before the other session fixtures (udevd, ...), which
    would otherwise fail first with a less helpful error.
    """
    if os.geteuid() != 0:
        pytest.fail(
            "integration tests need root (loop devices, mounts, udev, journald): "
            "run `make test` as root",
            pytrace=False,
        )
    if not _in_private_mount_namespace():
        pytest.fail(
            "integration tests must run in the private mount namespace that tests/conftest.py "
            f"sets up (re-exec under `unshare -m`, {NAMESPACE_ENV}=1); run pytest on `tests`",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def udevd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateUdevd]:
    """The session's own systemd-udevd, on a private /run/udev, in the session's network
    namespace (`testkit.udevd`); a udevd the machine runs is neither used nor touched."""
    with private_udevd(tmp_path_factory.mktemp("udevd")) as ours:
        yield ours


@pytest.fixture(scope="session")
def journald() -> Iterator[int | None]:
    """journald listening on its socket (`journal_fixture.running_journald`); PID if ours."""
    with running_journald() as pid:
        yield pid


@pytest.fixture(scope="session")
def udev_token(udevd: PrivateUdevd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A runtime udev rule tags loop devices backed by this session's files with this token."""
    token = f"s{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with udev_tag_rule(token, tmp_path_factory.getbasetemp().resolve()):
        yield token


@pytest.fixture
def journal(journald: int | None) -> JournalReader:
    """Read back journal entries written since this test started (`journal.entries(...)`)."""
    return JournalReader()


@pytest.fixture
def loop_devices(udevd: PrivateUdevd, udev_token: str) -> Iterator[LoopDevices]:
    """Attach images as loop devices; everything still attached is detached after the test."""
    loops = LoopDevices()
    try:
        yield loops
    finally:
        loops.cleanup()


@pytest.fixture
def sandbox_root(tmp_path: Path, loop_devices: LoopDevices) -> Iterator[Path]:
    """`tmp_path/root`: a minimal Debian 12 base tree (see `support.make_sandbox_root`).

    After the test every mount under it (volumes, overlays the daemon left, as it does on
    SIGTERM) is lazily unmounted, before the loop devices are detached.
    """
    root = make_sandbox_root(tmp_path / "root")
    try:
        yield root
    finally:
        unmount_tree(root)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """`tmp_path/spool` with done/ and failed/, as the daemon makes it."""
    directory = tmp_path / "spool"
    ensure_spool_dirs(directory)
    return directory


@pytest.fixture
def image(tmp_path: Path) -> Callable[..., Path]:
    """`image(name, files, fmt="squashfs", **kw)`: a personality image in this test's tmp."""

    def make(name: str, files: dict[str, object], fmt: str = "squashfs", **kw: object) -> Path:
        # build_image's own types are narrower; it refuses what it cannot build.
        return build_image(tmp_path, name, files, fmt, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def daemon_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sandbox_root: Path,
    udev_token: str,
    journald: int | None,
) -> Iterator[Callable[..., Daemon]]:
    """Make `Daemon`s (not started) on `sandbox_root` or another root; all stopped after.

    `make(root=None, *, config=None, env=None, name="personalityd", isolated=True)`; with
    `isolated=False` the config keeps the default match rules, so the daemon also sees
    volumes of other runs on this machine.
    """
    made: list[Daemon] = []
    request.node.stash[DAEMONS_KEY] = made

    def make(
        root: Path | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "personalityd",
        isolated: bool = True,
    ) -> Daemon:
        if any(d.name == name for d in made):
            name = f"{name}-{len(made) + 1}"
        daemon = Daemon(
            root or sandbox_root,
            tmp_path,
            udev_token=udev_token if isolated else None,
            config=config,
            env=env,
            name=name,
        )
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            daemon.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A `Daemon` on `sandbox_root` (isolated to this session's volumes); call `.start()`."""
    return daemon_factory()


@pytest.fixture
def udev_monitor(tmp_path: Path, udevd: PrivateUdevd) -> Iterator[UdevMonitor]:
    """`udevadm monitor --udev --property` on block devices, running for the whole test."""
    with UdevMonitor(tmp_path / "udev-monitor.log") as monitor:
        yield monitor


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach each daemon's log to the report of a failed test (setup, call or teardown)."""
    report = yield
    if report.failed:
        for daemon in item.stash.get(DAEMONS_KEY, []):
            text = daemon.log_text()
            if len(text) > 200_000:
                text = "[... earlier output cut ...]\n" + text[-200_000:]
            report.sections.append((f"{daemon.name} log ({daemon.log_path})", text))
    return report


@pytest.fixture(scope="module")
def personality_gid() -> int:
    """The `personality` group exists (created if missing and left: it is harmless)."""
    return ensure_group("personality")


@pytest.fixture(scope="module")
def member_user(personality_gid: int) -> Iterator[MemberUser]:
    """A temporary system user in the `personality` group; removed afterwards."""
    with temporary_member("personality") as member:
        yield member


# -- a private system bus, and the daemon served on it --------------------------------------


@pytest.fixture(scope="module")
def system_bus() -> Iterator[str]:
    with private_system_bus() as address:
        yield address


@pytest.fixture
def serve(system_bus: str) -> Serve:
    """`serve(daemon)`: start the daemon on the module's private system bus."""

    def start(daemon: Daemon) -> Daemon:
        return serve_on(daemon, system_bus)

    return start


@pytest.fixture
async def client(system_bus: str) -> AsyncIterator[MessageBus]:
    async with connection(system_bus) as bus:
        yield bus
