"""The Debian stacks' container: its root (the system tests' rootfs with the package), its
loop devices (the three images read-only, and an ext4 writable volume labelled
`personality-data`), its test-only configuration, and what the tests read inside.

Used by `tests/system/test_debian_stacks.py` and `demo/debian.py`, with `debian_stacks.py`
(the images).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from debian_stacks import WEB_URL
from nspawn import (
    Container,
    LoopDevices,
    install_deb,
    run,
    unpack_rootfs,
    write_file,
    write_udev_config,
)

WRITABLE_LABEL = "personality-data"
# The session's container (for the journal excerpt of a failed test) and the units it shows.
STACKS_CONTAINER_KEY = pytest.StashKey[Container]()


# --------------------------------------------------------------------------------------------
# the container's root and devices


def prepare_root(tarball: Path, dest: Path, deb: Path) -> Path:
    root = unpack_rootfs(tarball, dest)
    install_deb(root, deb)
    return root


def make_writable_image(path: Path, size_mb: int = 2048) -> Path:
    """A sparse ext4 image labelled `personality-data` (the writable volume)."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    run("mkfs.ext4", "-q", "-L", WRITABLE_LABEL, path)
    return path


def link_or_copy(source: Path, dest: Path) -> Path:
    """`dest` as a hard link to `source` (same filesystem), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
    return dest


def stacks_container(
    root: Path, workdir: Path, images: Mapping[str, Path], held: LoopDevices
) -> tuple[Container, str]:
    """The stacks' container, not booted yet: `images` (name -> image) attached read-only and a
    new writable volume attached read-write, then the configuration written. The loop devices
    are made of files in the run directory `workdir`, so a killed run's are swept. Returns the
    container and the writable volume's device."""
    volumes = {
        name: held.attach(link_or_copy(image, workdir / f"{name}.img"), read_only=True)
        for name, image in images.items()
    }
    writable = held.attach(make_writable_image(workdir / "data.ext4"), read_only=False)
    configure(root, volumes, writable)
    return Container(root, workdir, [*volumes.values(), writable]), writable


def configure(root: Path, volumes: Mapping[str, str], writable: str) -> None:
    """Configuration of the stacks' container (none of it ships in the package)."""
    kernels = "|".join(Path(dev).name for dev in volumes.values())
    write_file(
        root,
        "/etc/udev/rules.d/70-personalityd-stacks-test.rules",
        f'SUBSYSTEM=="block", KERNEL=="{kernels}", ENV{{PERSONALITYD_VOLUME}}="1"\n',
    )
    # The writable volume is found by the default writable.match (its label).
    write_file(
        root,
        "/etc/personalityd/personalityd.toml.d/50-stacks-test.toml",
        '[volumes]\nmatch = [{ PERSONALITYD_VOLUME = "1" }]\n',
    )
    assert Path(writable).name not in kernels.split("|")
    write_udev_config(root)
    # A unit that needs the web stack and asks for its PHP page once (its first request).
    write_file(
        root,
        "/etc/systemd/system/page-check.service",
        "[Unit]\n"
        "Description=stacks test: the web stack's PHP page, asked once\n"
        "Requires=personality@web.service\n"
        "After=personality@web.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart=/usr/bin/curl --silent --show-error --fail --max-time 20 "
        f"--output /run/page-check.out {WEB_URL}\n",
    )


def udp_listening(container: Container, port: int) -> bool:
    """Whether a UDP socket (v4 or v6) is bound to `port` (from /proc/net/udp*)."""
    text = container.sh("cat /proc/net/udp /proc/net/udp6 2>/dev/null").stdout
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and ":" in fields[1]:
            with contextlib.suppress(ValueError):
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# The files process argv[1] maps from /usr or /etc that are not on the base (as its read-only
# reference shows it): an overlay of some generation, current or lazily unmounted.
MAPPED_FROM_STACK = """\
import os, sys
base = {h: os.stat(f"/run/personalityd/base/_{h}").st_dev for h in ("usr", "etc")}
for line in open(f"/proc/{sys.argv[1]}/maps"):
    fields = line.split(maxsplit=5)
    if len(fields) == 6 and fields[5].startswith(("/usr/", "/etc/")):
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if os.makedev(major, minor) != base[fields[5][1:4]]:
            print(fields[5].strip())
"""
