"""The three Debian stacks under a real systemd, with a writable volume (issue 11).

web (nginx, php-fpm, MariaDB), datascience (numpy, pandas, Jupyter, R) and gameserver
(minetest-server) are built in the session with `personalityctl build --packages` from Debian
bookworm's packages, against the system test's rootfs with the package installed
(`debian_stacks.py`), and attached in one container booted with systemd-nspawn. The tests share
that container and run in file order; each leaves the stack as the next one expects.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from debian_stacks import (
    GAME_PORT,
    GAME_SERVICE,
    WEB_ROW,
    WEB_SERVICES,
    WEB_URL,
    BuiltStack,
    build_stacks,
    expected_conflicts,
)
from nspawn import (
    Container,
    LoopDevices,
    attached_loops,
    rootfs_tarball,
    run_dir,
    wait_until,
)
from stacks_machine import (
    MAPPED_FROM_STACK,
    STACKS_CONTAINER_KEY,
    prepare_root,
    stacks_container,
    udp_listening,
)

ORPHAN_ID = "ff355680e36e48609dc2bf9664415a79"
ALL = ("web", "datascience", "gameserver")
# Slow steps on a loaded 2-core machine: MariaDB's first start, R and pandas imports.
SERVICE_TIMEOUT = 180
ETC_MARKER = "/etc/stacks-test-marker.conf"
ETC_CONTENT = "written with nothing attached\n"
NUMPY_DIR = "/usr/lib/python3/dist-packages/numpy"
PYC_NAME = "stacks_test.cpython-311.pyc"


class Stacks:
    """The session's container and what it was built from."""

    def __init__(self, container: Container, built: dict[str, BuiltStack], writable: str) -> None:
        self.c = container
        self.built = built
        self.writable = writable

    # -- reading ----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(
            self.c.run("personalityctl", "status", "--json").stdout
        )
        return result

    def attached(self) -> list[str]:
        value = self.status()["attached"]
        assert isinstance(value, list)
        return [str(v) for v in value]

    def ok(self, *cmd: str, timeout: float = 120) -> bool:
        return self.c.run(*cmd, check=False, timeout=timeout).returncode == 0

    def exists(self, path: str) -> bool:
        return self.ok("test", "-e", path)

    def writable_mount(self) -> str:
        """Where the writable volume is mounted inside (the daemon mounts it)."""
        out = self.c.run("findmnt", "-rn", "-o", "TARGET", "-S", self.writable, check=False)
        targets = out.stdout.split()
        assert targets, f"the writable volume {self.writable} is not mounted in the container"
        return targets[0]

    # -- changing ---------------------------------------------------------------------------

    def attach(self, name: str) -> None:
        self.c.run("personalityctl", "attach", name, "--wait", "60", timeout=300)

    def detach(self, name: str) -> None:
        self.c.run("personalityctl", "detach", name, timeout=300)

    def wait_services(self, units: tuple[str, ...], state: str = "active") -> None:
        for unit in units:
            self.c.wait_active(unit, state, timeout=SERVICE_TIMEOUT)

    def page(self) -> str:
        return self.c.run("curl", "-sS", "--fail", "--max-time", "30", WEB_URL).stdout

    def reboot(self) -> None:
        self.c.poweroff(timeout=180)
        self.c.boot(timeout=300)


@pytest.fixture(scope="session")
def stacks_workdir() -> Iterator[Path]:
    with run_dir() as path:
        yield path


@pytest.fixture(scope="session")
def stack_loops() -> Iterator[LoopDevices]:
    with attached_loops() as held:
        yield held


@pytest.fixture(scope="session")
def stacks(
    request: pytest.FixtureRequest, deb: Path, stacks_workdir: Path, stack_loops: LoopDevices
) -> Generator[Stacks, None, None]:
    missing = [t for t in ("unsquashfs", "mkfs.ext4", "dpkg-deb", "unshare") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"the Debian stacks test needs {', '.join(missing)}: run `make deps system-deps`"
        )
    tarball = rootfs_tarball()
    root = prepare_root(tarball, stacks_workdir / "rootfs", deb)
    started = time.monotonic()
    built = build_stacks(root, tarball)
    print(f"\nstack images ready in {time.monotonic() - started:.0f} s")
    machine, writable = stacks_container(
        root, stacks_workdir, {name: b.image for name, b in built.items()}, stack_loops
    )
    request.config.stash[STACKS_CONTAINER_KEY] = machine
    try:
        machine.boot(timeout=300)
        yield Stacks(machine, built, writable)
    finally:
        machine.cleanup()


# --------------------------------------------------------------------------------------------


def test_nothing_of_the_stacks_before_attach(stacks: Stacks) -> None:
    stacks.c.wait_active("personalityd.service")
    states = stacks.c.personalities()
    assert states == dict.fromkeys(ALL, "available"), states
    assert stacks.status()["writable_device"] == stacks.writable, stacks.status()
    assert not stacks.ok("python3", "-c", "import numpy, pandas")
    assert not stacks.ok("sh", "-c", "command -v Rscript")
    assert not stacks.ok("getent", "passwd", "mysql")
    assert not udp_listening(stacks.c, GAME_PORT)
    # What the builds found to run (datascience has no service).
    web, game = stacks.built["web"].services(), stacks.built["gameserver"].services()
    assert set(WEB_SERVICES) <= set(web), f"web's PERSONALITY_SERVICES: {web}"
    assert GAME_SERVICE in game, f"gameserver's PERSONALITY_SERVICES: {game}"
    assert stacks.built["datascience"].services() == []


def test_attach_all_three(stacks: Stacks) -> None:
    for name in ALL:
        stacks.attach(name)
    assert stacks.attached() == list(ALL)

    # web: the services from PERSONALITY_SERVICES, the user from its sysusers.d, the page.
    stacks.wait_services(WEB_SERVICES)
    assert stacks.ok("getent", "passwd", "mysql"), "the mysql user was not created at attach"
    assert stacks.exists("/usr/lib/sysusers.d/web.conf")
    assert "mysql" in stacks.c.read("/usr/lib/sysusers.d/web.conf")
    assert stacks.page() == WEB_ROW

    # datascience
    stacks.c.run("python3", "-c", "import numpy, pandas", timeout=SERVICE_TIMEOUT)
    r = stacks.c.run("Rscript", "-e", "print(sum(1:10))", timeout=SERVICE_TIMEOUT)
    assert r.stdout.strip() == "[1] 55", r.stdout
    jupyter = stacks.c.run("jupyter", "notebook", "--version", timeout=SERVICE_TIMEOUT)
    assert jupyter.stdout.strip()[:1].isdigit(), jupyter.stdout

    # gameserver
    stacks.wait_services((GAME_SERVICE,))
    wait_until(lambda: udp_listening(stacks.c, GAME_PORT), 60, "minetest on UDP 30000")


def test_conflicts_are_the_trees_overlaps(stacks: Stacks) -> None:
    reported = json.loads(stacks.c.run("personalityctl", "conflicts", "--json").stdout)
    got = {
        c["path"]: {"winner": c["winner"], "shadowed": c["shadowed"], "identical": c["identical"]}
        for c in reported
    }
    want = expected_conflicts([stacks.built[name] for name in ALL])
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, (
        f"{len(missing)} conflicts missing, e.g. {missing[:10]}; "
        f"{len(extra)} unexpected, e.g. {extra[:10]}"
    )
    wrong = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
    assert not wrong, f"{len(wrong)} conflicts differ, e.g. {list(wrong.items())[:5]}"


def test_detach_web_leaves_the_others_running(stacks: Stacks) -> None:
    game_pid = stacks.c.show(GAME_SERVICE, "MainPID")["MainPID"]
    stacks.detach("web")
    assert stacks.attached() == ["datascience", "gameserver"]
    for unit in (*WEB_SERVICES, "personality@web.service"):
        assert stacks.c.is_active(unit) == "inactive", unit  # stopped, not failed
    assert not stacks.ok("curl", "-sS", "--max-time", "10", WEB_URL)
    assert not stacks.exists("/usr/sbin/nginx")
    # The other two did not notice.
    assert stacks.c.show(GAME_SERVICE, "MainPID")["MainPID"] == game_pid
    assert udp_listening(stacks.c, GAME_PORT)
    stacks.c.run("python3", "-c", "import numpy, pandas", timeout=SERVICE_TIMEOUT)


def test_daemon_restart_then_detach_releases_the_volume(stacks: Stacks) -> None:
    stacks.c.run("systemctl", "restart", "personalityd.service", timeout=180)
    stacks.c.wait_active("personalityd.service")
    assert stacks.attached() == ["datascience", "gameserver"]
    pid = stacks.c.show("personalityd.service", "MainPID")["MainPID"]

    stacks.detach("datascience")
    assert stacks.attached() == ["gameserver"]
    # minetest was started while datascience was stacked: what it maps holds that generation's
    # overlay, and the overlay holds every one of its layers. Restarted, it runs from the new
    # generation; then nothing but the daemon could still hold datascience.
    stacks.c.run("systemctl", "restart", GAME_SERVICE, timeout=120)
    wait_until(
        lambda: stacks.c.personalities()["datascience"] == "available",
        90,
        "datascience to be released (available, not draining) after the daemon's restart",
    )
    on_stack = stacks.c.run("python3", "-c", MAPPED_FROM_STACK, pid).stdout.split()
    assert on_stack == [], f"the daemon maps {len(on_stack)} files from a stack: {on_stack[:10]}"
    assert not stacks.ok("python3", "-c", "import numpy")
    wait_until(lambda: udp_listening(stacks.c, GAME_PORT), 60, "minetest on UDP 30000")


def test_reboot_brings_the_stack_and_its_services_back(stacks: Stacks) -> None:
    stacks.attach("web")
    stacks.attach("datascience")
    before = stacks.attached()
    assert before == ["gameserver", "web", "datascience"]
    stacks.wait_services(WEB_SERVICES)

    stacks.reboot()

    assert stacks.attached() == before
    stacks.wait_services((*WEB_SERVICES, GAME_SERVICE))
    for name in before:
        stacks.c.wait_active(f"personality@{name}.service", timeout=SERVICE_TIMEOUT)
    assert stacks.page() == WEB_ROW
    wait_until(lambda: udp_listening(stacks.c, GAME_PORT), 60, "minetest on UDP 30000")
    stacks.c.run("python3", "-c", "import numpy, pandas", timeout=SERVICE_TIMEOUT)


def test_unit_after_personality_web_finds_the_page_at_once(stacks: Stacks) -> None:
    for attempt in range(1, 21):
        stacks.c.run("systemctl", "stop", "personality@web.service", timeout=300)
        assert "web" not in stacks.attached(), f"attempt {attempt}: web still attached"
        stacks.c.run("rm", "-f", "/run/page-check.out")
        started = stacks.c.run("systemctl", "start", "page-check.service", check=False, timeout=300)
        assert started.returncode == 0, (
            f"attempt {attempt}: page-check.service failed on its first request:\n"
            + stacks.c.journal("-u", "page-check.service", lines=20)
        )
        assert stacks.c.read("/run/page-check.out") == WEB_ROW, f"attempt {attempt}"


def test_etc_write_with_nothing_attached_survives(stacks: Stacks) -> None:
    for name in ("web", "datascience", "gameserver"):
        stacks.detach(name)
    assert stacks.attached() == []
    stacks.c.run("sh", "-c", f"printf '{ETC_CONTENT}' > {ETC_MARKER}")

    stacks.attach("web")
    assert stacks.c.read(ETC_MARKER) == ETC_CONTENT, "hidden by attach"
    stacks.detach("web")
    assert stacks.c.read(ETC_MARKER) == ETC_CONTENT, "hidden by detach"
    stacks.reboot()
    assert stacks.attached() == []
    assert stacks.c.read(ETC_MARKER) == ETC_CONTENT, "lost in the reboot"
    # It is on the writable volume, not on the base.
    assert stacks.exists(f"{stacks.writable_mount()}/upper/_etc{ETC_MARKER[4:]}")


def test_writes_under_a_detached_personality_are_moved_aside(stacks: Stacks) -> None:
    stacks.attach("datascience")
    pycache = f"{NUMPY_DIR}/__pycache__"
    stacks.c.run("sh", "-c", f"echo stale > {pycache}/{PYC_NAME}")
    stacks.c.run(
        "sh", "-c", f"mkdir -p {NUMPY_DIR}/stacks_test && echo x > {NUMPY_DIR}/stacks_test/x"
    )
    generation_before = int(str(stacks.status()["generation"]))
    stacks.detach("datascience")

    # Nothing of it in the stacked view: numpy is gone, not an empty namespace package.
    assert not stacks.exists(NUMPY_DIR)
    assert not stacks.ok("python3", "-c", "import numpy")
    assert not stacks.exists(f"{stacks.writable_mount()}/upper/_usr{NUMPY_DIR[4:]}")

    # The writes are on the writable volume, under orphans/.
    mount = stacks.writable_mount()
    found = stacks.c.run("find", f"{mount}/orphans", "-name", PYC_NAME).stdout.split()
    assert found, f"{PYC_NAME} not under {mount}/orphans"
    assert found[0].endswith(f"{NUMPY_DIR[4:]}/__pycache__/{PYC_NAME}"), found
    assert stacks.c.read(found[0]) == "stale\n"
    assert stacks.c.run("find", f"{mount}/orphans", "-path", "*/numpy/stacks_test/x").stdout

    # And journalled, one entry per directory moved aside.
    out = stacks.c.run(
        "journalctl", "--no-pager", "-o", "json", f"MESSAGE_ID={ORPHAN_ID}", timeout=60
    ).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    ours = [e for e in entries if e.get("PERSONALITY_NAME") == "datascience"]
    assert ours, f"no {ORPHAN_ID} journal entry for datascience: {entries[:3]}"
    paths = {str(e.get("PERSONALITY_PATH")) for e in ours}
    assert any(p.startswith(NUMPY_DIR) or NUMPY_DIR.startswith(p) for p in paths), paths
    assert all(int(e["PERSONALITY_GENERATION"]) >= generation_before for e in ours), ours


def test_bind_mount_in_etc_stays_visible(stacks: Stacks) -> None:
    # As a container manager binds /etc/resolv.conf: a file bound over one in /etc.
    stacks.c.run("sh", "-c", "echo bound > /run/stacks-bind.conf && touch /etc/stacks-bind.conf")
    stacks.c.run("mount", "--bind", "/run/stacks-bind.conf", "/etc/stacks-bind.conf")
    try:
        stacks.attach("web")
        assert stacks.c.read("/etc/stacks-bind.conf") == "bound\n", "hidden by attach"
        assert stacks.exists("/etc/nginx/conf.d/stack-web.conf")
        stacks.detach("web")
        assert stacks.c.read("/etc/stacks-bind.conf") == "bound\n", "hidden by detach"
    finally:
        stacks.c.run("umount", "/etc/stacks-bind.conf", check=False)
