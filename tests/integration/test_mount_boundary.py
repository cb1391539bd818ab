"""The stack's mounts as a trust boundary (docs/architecture.md, "The stack's mounts"):

- overlay metadata in a volume is data: a lower layer's `trusted.overlay.redirect` and
  `metacopy` attributes are never followed;

Each attack is made from outside: images with hostile attributes attached as loop devices,
files read through the sandbox root by uid 65534 without groups, mountinfo, the daemon's log.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from sandbox_view import ok

from testkit.daemon import Daemon
from testkit.images import FileSpec, format_os_release, pack_image, write_tree
from testkit.loops import LoopDevices
from testkit.nobody import run_as_nobody

SECRET = b"secret of the base, for root only\n"
REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"

def xattr_image(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    xattrs: Mapping[str, Mapping[str, bytes]],
    fmt: str = "squashfs",
    label: str | None = None,
    modes: Mapping[str, int] | None = None,
) -> Path:
    """A personality image whose tree has extended attributes and directory modes set
    before packing (root-relative path -> {attribute: value} / mode)."""
    images = tmp_path / "hostile-images"
    src = images / f"{name}.tree"
    write_tree(src, files)
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text(format_os_release({"ID": "_any"}))
    for rel, attrs in xattrs.items():
        for key, value in attrs.items():
            os.setxattr(src / rel, key, value, follow_symlinks=False)
    for rel, mode in (modes or {}).items():
        os.chmod(src / rel, mode)
    image = images / f"{name}.{fmt}"
    pack_image(src, image, fmt, label)
    return image


def secret_in_base(root: Path) -> None:
    """usr/secret (0700, root) holding key (0644): only root may reach the key."""
    secret = root / "usr/secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_bytes(SECRET)
    os.chmod(secret / "key", 0o644)
    os.chmod(secret, 0o700)


def as_nobody(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_as_nobody(root, *argv)


# -- overlay metadata in a volume is data ------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "api"),
    [
        ("squashfs", "lowerdir+"),
        ("ext4", "lowerdir+"),
        ("erofs", "lowerdir+"),
        ("squashfs", "legacy"),
    ],
)
def test_lower_layer_redirects_and_metacopy_are_not_followed(
    fmt: str,
    api: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    """A volume directory redirected to a 0700 base directory, and a metacopy file
    redirected to a file in it: uid 65534 reads neither the base's secret through them."""
    secret_in_base(sandbox_root)
    assert as_nobody(sandbox_root, "cat", "usr/secret/key").returncode != 0
    files: dict[str, FileSpec] = {
        "usr/share/peek/README": "the volume's own file\n",
        "usr/bin/peek": ("file", b"", 0o755),
    }
    xattrs = {
        "usr/share/peek": {REDIRECT: b"/secret"},
        "usr/bin/peek": {METACOPY: b"", REDIRECT: b"/secret/key"},
    }
    label = "personality-rd" if fmt == "ext4" else None
    loop_devices.attach(xattr_image(tmp_path, "redir", files, xattrs, fmt, label))
    daemon.update_config({"stack": {"overlay_api": api}})
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "redir"}))

    volume = sandbox_root / "opt/personality/redir"
    assert os.getxattr(volume / "usr/share/peek", REDIRECT) == b"/secret", "test is void"
    assert os.getxattr(volume / "usr/bin/peek", METACOPY) == b"", "test is void"
    # Not followed: overlayfs refuses the redirected directory (EPERM) rather than merge the
    # base's 0700 directory into it.
    listing = as_nobody(sandbox_root, "ls", "usr/share/peek")
    assert "key" not in listing.stdout.split(), "the redirect was followed into the base"
    for path in ("usr/share/peek/key", "usr/bin/peek"):
        got = as_nobody(sandbox_root, "cat", path)
        assert SECRET.decode() not in got.stdout, f"uid 65534 read the secret through {path}"
    for path in ("usr/share/peek/key", "usr/bin/peek"):  # not even root reads it there
        try:
            as_root = (sandbox_root / path).read_bytes()
        except OSError as exc:  # overlayfs refuses to follow: ENOENT or EPERM
            assert exc.errno in (errno.ENOENT, errno.EPERM), exc
            as_root = b""
        assert as_root != SECRET, path
    assert "redirect_dir=nofollow" in _super_options(sandbox_root / "usr")


def _super_options(path: Path) -> list[str]:
    """The superblock options of the top mount at `path` (the last field of mountinfo)."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                found = right.split()[2].split(",")
    return found

