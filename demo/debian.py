"""`make demo-debian`: the three stacks from Debian's own packages, under systemd in nspawn.

Builds web, datascience and gameserver with `personalityctl build --packages` against the
system tests' Debian 12 rootfs (with the package installed), boots that rootfs with
systemd-nspawn with the three images and a writable volume on loop devices, attaches them and
shows each one working. The images and downloads are the system tests' caches
(`.cache/stacks`, `.cache/apt`, `.cache/system`), so a second run builds nothing.

Run by `demo/debian.sh` (as root, with the package built); everything it makes lives in one
run directory under `.cache/system/` and is removed at the end: the container is powered off,
the loop devices it attached are detached by name, the directory is deleted. A run that is
killed is cleaned up by the next one (or the next system test session).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from debian_stacks import (
    GAME_PORT,
    GAME_SERVICE,
    WEB_SERVICES,
    WEB_URL,
    build_stacks,
)
from nspawn import Container, attached_loops, new_run_dir, rootfs_tarball, wait_until
from stacks_machine import (
    prepare_root,
    stacks_container,
    udp_listening,
)

BOLD = "\033[1m"
PLAIN = "\033[0m"
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{PLAIN}  [{time.monotonic() - STARTED:.0f} s]", flush=True)


def show(container: Container, *cmd: str, timeout: float = 180) -> str:
    print(f"$ {' '.join(cmd)}", flush=True)
    out = container.run(*cmd, timeout=timeout).stdout
    print(out.rstrip(), flush=True)
    return out


def main(deb: Path) -> int:
    workdir = new_run_dir()
    try:
        with attached_loops() as held:
            say("the rootfs: Debian 12 with personalityd installed")
            tarball = rootfs_tarball()
            root = prepare_root(tarball, workdir / "rootfs", deb)

            say("building the stacks from Debian packages (cached in .cache/stacks)")
            built = build_stacks(root, tarball)
            for name, b in built.items():
                size = b.image.stat().st_size / 1e6
                print(f"  {name:12} {' '.join(b.stack.packages)}")
                print(f"  {'':12} {size:.0f} MB, services: {' '.join(b.services())}")

            container, _ = stacks_container(
                root, workdir, {name: b.image for name, b in built.items()}, held
            )
            try:
                say("booting systemd in nspawn")
                container.boot(timeout=300)
                show(container, "personalityctl", "list")
                demo(container)
            finally:
                say("cleaning up: power off, detach our loop devices, remove the run directory")
                container.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("done")
    return 0


def demo(c: Container) -> None:
    say("attaching web, datascience and gameserver")
    for name in ("web", "datascience", "gameserver"):
        show(c, "personalityctl", "attach", name, "--wait", "60", timeout=300)
    for unit in (*WEB_SERVICES, GAME_SERVICE):
        c.wait_active(unit, timeout=180)
    show(c, "personalityctl", "status")

    say("web: nginx -> php-fpm -> MariaDB")
    show(c, "systemctl", "is-active", *WEB_SERVICES, "personality@web.service")
    show(c, "getent", "passwd", "mysql")
    show(c, "curl", "-sS", "--fail", WEB_URL)

    say("datascience: numpy, pandas, R, Jupyter")
    show(
        c,
        "python3",
        "-c",
        "import numpy, pandas; a = numpy.arange(10); "
        "print('numpy', numpy.__version__, 'sum', a.sum()); "
        "print(pandas.DataFrame({'x': a[:3]}).describe().loc[['mean', 'max']])",
    )
    show(c, "Rscript", "-e", "print(sum(1:10))")
    show(c, "jupyter", "notebook", "--version")

    say("gameserver: minetest-server on UDP 30000")
    wait_until(lambda: udp_listening(c, GAME_PORT), 60, "minetest on UDP 30000")
    show(c, "systemctl", "is-active", GAME_SERVICE)
    show(c, "sh", "-c", f"grep -i ':{GAME_PORT:04X} ' /proc/net/udp /proc/net/udp6")

    say("conflicts between the three (the last attached wins)")
    conflicts = json.loads(c.run("personalityctl", "conflicts", "--json").stdout)
    print(f"{len(conflicts)} conflicts, {sum(1 for x in conflicts if x['identical'])} identical")
    table = c.run("personalityctl", "conflicts").stdout.splitlines()
    print("\n".join(table[:12]))
    if len(table) > 12:
        print(f"... ({len(table) - 12} more lines)")

    say("detaching gameserver: its service stops, the others keep running")
    show(c, "personalityctl", "detach", "gameserver", timeout=300)
    wait_until(lambda: c.is_active(GAME_SERVICE) == "inactive", 60, "minetest to stop")
    print(
        f"{GAME_SERVICE}: {c.is_active(GAME_SERVICE)}; listening on UDP {GAME_PORT}: "
        f"{udp_listening(c, GAME_PORT)}"
    )
    show(c, "curl", "-sS", "--fail", WEB_URL)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: debian.py PACKAGE.deb")
    sys.exit(main(Path(sys.argv[1]).resolve()))
