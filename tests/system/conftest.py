"""System tests: the Debian package installed in a Debian 12 rootfs booted with systemd-nspawn.

Not part of `make test`: these need root, debootstrap (the first time), a built `.deb` and a few
minutes. They run with `make system-test` (which builds the package first), or explicitly:

    PERSONALITYD_SYSTEM_TEST=1 .venv/bin/python -m pytest tests/system

This directory is skipped by collection unless `PERSONALITYD_SYSTEM_TEST=1` is set or a path
inside it is named on the command line, so a plain `pytest tests` never boots containers.

| fixture | scope | gives |
|---|---|---|
| `deb` | session | `$PERSONALITYD_DEB`, else the newest `build/deb/personalityd_*_all.deb` |
| `workdir` | session | `.cache/system/run-<token>/`, removed after (unless `..._SYSTEM_KEEP=1`) |
| `images` | session | name -> squashfs image of the test personalities (`web`, `demo`) |
| `container` | session | the booted `Container`, with the package and the test units installed |

When a test fails, the container's journal (personalityd and the test units) is attached to
its report.

A run killed before its cleanup (CI timeout, SIGKILL) leaves its loop devices, cgroups and run
directory behind; the next session sweeps them (`sweep_stale_runs`), and nspawn halts its
container by itself once the test process is gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from debian_stacks import STACKS_UNITS
from nspawn import (
    DEMO_LIBRARY,
    DEMO_STATE,
    DEMO_USER,
    FAKE_TOOL_MARKER,
    REPO,
    WEB_INDEX,
    Container,
    LoopDevices,
    attached_loops,
    build_image,
    enable_unit,
    install_deb,
    rootfs_tarball,
    run,
    run_dir,
    unpack_rootfs,
    write_file,
    write_udev_config,
)
from stacks_machine import STACKS_CONTAINER_KEY
from trials_machine import TRIALS_CONTAINER_KEY, TRIALS_UNITS

SYSTEM_TEST_ENV = "PERSONALITYD_SYSTEM_TEST"
HERE = Path(__file__).resolve().parent
CONTAINER_KEY = pytest.StashKey[Container]()


def _named_on_command_line(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if os.environ.get(SYSTEM_TEST_ENV) == "1" or _named_on_command_line(config):
        return None
    return True if collection_path.parent == HERE and collection_path != HERE else None


# --------------------------------------------------------------------------------------------
# preconditions and inputs


@pytest.fixture(scope="session", autouse=True)
def _system_preconditions() -> None:
    """Fail (never skip) when the system tests cannot run for real here."""
    if os.geteuid() != 0:
        pytest.fail("system tests need root (debootstrap, loop devices, systemd-nspawn)")
    missing = [
        tool
        for tool in ("systemd-nspawn", "debootstrap", "mksquashfs", "losetup", "nsenter", "zstd")
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail(
            f"system tests need {', '.join(missing)}: run `make system-deps` "
            "(apt-get install systemd-container debootstrap squashfs-tools zstd)"
        )


@pytest.fixture(scope="session")
def deb() -> Path:
    explicit = os.environ.get("PERSONALITYD_DEB")
    if explicit:
        return Path(explicit).resolve()
    debs = sorted((REPO / "build/deb").glob("personalityd_*_all.deb"), key=os.path.getmtime)
    if not debs:
        pytest.fail("no package in build/deb: run `make deb` first (make system-test does)")
    return debs[-1]


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with run_dir() as path:
        yield path


@pytest.fixture(scope="session")
def images(workdir: Path) -> dict[str, Path]:
    base = {"ID": "debian", "VERSION_ID": "12", "IMAGE_VERSION": "1.0"}
    web = build_image(
        workdir,
        "web",
        {"usr/share/web/index.html": WEB_INDEX},
        {**base, "PERSONALITY_DESCRIPTION": "static web content"},
    )
    multiarch = "x86_64-linux-gnu"
    demo = build_image(
        workdir,
        "demo",
        {
            "usr/lib/systemd/system/demo-web.service": (
                "[Unit]\n"
                "Description=Demo web service shipped inside the demo personality\n\n"
                "[Service]\n"
                # Its directory comes from the personality's tmpfiles.d, applied before the
                # service starts; the second of start-up makes a race with it visible.
                "ExecStartPre=/bin/sh -c 'test -d /var/lib/demo && sleep 1'\n"
                "ExecStart=/usr/lib/demo-web/run\n"
            ),
            "usr/lib/sysusers.d/demo.conf": f'u {DEMO_USER} - "demo service" /var/lib/demo\n',
            "usr/lib/tmpfiles.d/demo.conf": f"d /var/lib/demo 0750 {DEMO_USER} {DEMO_USER} -\n",
            f"usr/lib/{multiarch}/{DEMO_LIBRARY}": Path(
                f"/usr/lib/{multiarch}/{DEMO_LIBRARY}"
            ).read_bytes(),
            "usr/bin/systemd-sysusers": f"#!/bin/sh\ntouch {FAKE_TOOL_MARKER}\nexit 0\n",
            "usr/lib/demo-web/run": (
                f"#!/bin/sh\necho '{DEMO_STATE}' > /run/demo-web.state\nexec sleep infinity\n"
            ),
        },
        {**base, "PERSONALITY_SERVICES": "demo-web.service"},
    )
    return {"web": web, "demo": demo}


@pytest.fixture(scope="session")
def loop_devices() -> Iterator[LoopDevices]:
    with attached_loops() as held:
        yield held


# --------------------------------------------------------------------------------------------
# the container


def _configure(root: Path, loops: dict[str, str]) -> None:
    """Test-only configuration of the installed system (none of it ships in the package)."""
    kernels = "|".join(Path(dev).name for dev in loops.values())
    # Only this session's loop devices are personality volumes in there: the shipped udev
    # mechanism (PERSONALITYD_VOLUME=1 set by an admin's rule) with the matching config.
    write_file(
        root,
        "/etc/udev/rules.d/70-personalityd-system-test.rules",
        f'SUBSYSTEM=="block", KERNEL=="{kernels}", ENV{{PERSONALITYD_VOLUME}}="1"\n',
    )
    write_file(
        root,
        "/etc/personalityd/personalityd.toml.d/50-system-test.toml",
        "[volumes]\n"
        'match = [{ PERSONALITYD_VOLUME = "1" }]\n\n'
        "[writable]\n"
        "# no writable volume in the container: read-only stacks\n"
        'match = [{ PERSONALITYD_SYSTEM_TEST_WRITABLE = "1" }]\n\n'
        "[debug]\n"
        "block_signal = true\n",
    )
    write_udev_config(root)
    # An application that needs the web personality.
    write_file(
        root,
        "/etc/systemd/system/app.service",
        "[Unit]\n"
        "Description=system test application using the web personality\n"
        "Requires=personality@web.service\n"
        "After=personality@web.service\n\n"
        "[Service]\n"
        "ExecStart=/bin/sh -c "
        "'cat /usr/share/web/index.html > /run/app.out; exec sleep infinity'\n",
    )
    # An application that needs the demo personality (and so its service).
    write_file(
        root,
        "/etc/systemd/system/demo-app.service",
        "[Unit]\n"
        "Description=system test application using the demo personality\n"
        "Requires=personality@demo.service\n"
        "After=personality@demo.service\n\n"
        "[Service]\n"
        "ExecStart=/bin/sleep infinity\n",
    )
    # What a unit ordered after personalityd sees at boot.
    write_file(
        root,
        "/etc/systemd/system/early-check.service",
        "[Unit]\n"
        "Description=system test: what a unit ordered after personalityd sees at boot\n"
        "Wants=personalityd.service\n"
        "After=personalityd.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "ExecStart=/bin/sh -c 'cat /usr/share/web/index.html > /run/early-check.out "
        "|| echo missing > /run/early-check.out'\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n",
    )
    enable_unit(root, "early-check.service")
    run("chroot", root, "useradd", "--create-home", "tester")
    run("chroot", root, "useradd", "--create-home", "--groups", "personality", "member")


@pytest.fixture(scope="session")
def container(
    request: pytest.FixtureRequest,
    deb: Path,
    workdir: Path,
    images: dict[str, Path],
    loop_devices: LoopDevices,
) -> Generator[Container, None, None]:
    root = unpack_rootfs(rootfs_tarball(), workdir / "rootfs")
    install_deb(root, deb)
    loops = {name: loop_devices.attach(image) for name, image in images.items()}
    _configure(root, loops)
    machine = Container(root, workdir, list(loops.values()))
    request.config.stash[CONTAINER_KEY] = machine
    try:
        machine.boot()
        yield machine
    finally:
        machine.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if not report.failed:
        return report
    if "stacks" in getattr(item, "fixturenames", ()):
        machine = item.config.stash.get(STACKS_CONTAINER_KEY, None)
        units: tuple[str, ...] = STACKS_UNITS
    elif "trials" in getattr(item, "fixturenames", ()):
        machine = item.config.stash.get(TRIALS_CONTAINER_KEY, None)
        units = TRIALS_UNITS
    else:
        machine = item.config.stash.get(CONTAINER_KEY, None)
        units = (
            "personalityd.service",
            "personality@*",
            "app.service",
            "demo-web.service",
            "demo-app.service",
        )
    if machine is not None and machine.running:
        args = [arg for unit in units for arg in ("-u", unit)]
        report.sections.append(("container journal", machine.journal(*args, lines=150)))
    return report
