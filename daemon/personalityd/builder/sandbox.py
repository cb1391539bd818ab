"""Running the base's own apt and dpkg in a chroot over an overlay of the base.

Every command runs in a mount namespace of its own (`unshare --mount --propagation private`,
so nothing is mounted, or left mounted, outside it). There, this module's `main()`:

1. binds the base read-only (`lower`) and mounts an overlay on `merged` with the build's
   scratch `upper` (`redirect_dir=off,metacopy=off,index=off,xino=off`: the upper holds plain
   files and directories, whiteouts and opaque marks only);
2. mounts proc, a read-only sysfs, a small /dev (null, zero, full, random, urandom, tty, a
   private devpts, a tmpfs /dev/shm), tmpfs on /run and /tmp, and binds the host's
   resolv.conf over the base's;
3. binds the download cache over `/var/lib/apt/lists` and `/var/cache/apt/archives`, and the
   directory of local `.deb` files at `/run/personalityd-build/debs`;
4. writes `/usr/sbin/policy-rc.d` (exit 101: no service is started) into the overlay;
5. execs `chroot MERGED COMMAND...` with a clean environment.

When the command ends the namespace goes away with every mount in it; the base is never
written (its bind is read-only, and overlayfs writes only to the upper).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

DEBS_IN_CHROOT: Final = "/run/personalityd-build/debs"
POLICY_RC_D: Final = (
    "#!/bin/sh\n# personalityctl build: no service is started in the chroot\nexit 101\n"
)
CHROOT_ENV: Final = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}
FAILURE_PREFIX: Final = "personalityd-sandbox: "
DEV_NODES: Final = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class Layout:
    """The paths of one build (all absolute; `base` is never written)."""

    base: str
    lower: str
    upper: str
    work: str
    merged: str
    lists: str
    archives: str
    debs: str = ""
    resolv_conf: str = "/etc/resolv.conf"


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{FAILURE_PREFIX}mount {' '.join(args)}: {proc.stderr.strip()}")


def _inside(merged: str, path: str) -> str:
    return os.path.join(merged, path.lstrip("/"))


def _mkdirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _bind_file(source: str, target: str) -> None:
    if not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    _mount("--bind", source, target)


def _resolv_target(merged: str) -> str:
    """Where the chroot's resolv.conf is, following a symlink inside the chroot (once)."""
    path = _inside(merged, "etc/resolv.conf")
    if os.path.islink(path):
        target = os.readlink(path)
        absolute = target if target.startswith("/") else os.path.join("/etc", target)
        return _inside(merged, os.path.normpath(absolute))
    return path


def _dev(merged: str) -> None:
    dev = _inside(merged, "dev")
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", dev)
    for node in DEV_NODES:
        _bind_file(f"/dev/{node}", os.path.join(dev, node))
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts",
           _mkdirs(os.path.join(dev, "pts")))  # fmt: skip
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    _mount(
        "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", _mkdirs(os.path.join(dev, "shm"))
    )
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, os.path.join(dev, name))


def set_up(layout: Layout) -> None:
    """The mounts of the module docstring, in this (private) mount namespace."""
    _mount("--make-rprivate", "/")
    _mount("--bind", layout.base, layout.lower)
    _mount("-o", "remount,bind,ro", layout.lower)
    # The bind is not recursive: a base of '/' is its root file system as it is below any
    # mount (a personality stack on /usr included). A /usr of its own cannot be used.
    if not os.path.exists(os.path.join(layout.lower, "usr/bin/dpkg")):
        raise SystemExit(f"{FAILURE_PREFIX}{layout.base}/usr is not on the base's root file system")
    options = (
        f"lowerdir={layout.lower},upperdir={layout.upper},workdir={layout.work},"
        "redirect_dir=off,metacopy=off,index=off,xino=off"
    )
    _mount("-t", "overlay", "-o", options, "overlay", layout.merged)
    m = layout.merged
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", _mkdirs(_inside(m, "proc")))
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", _mkdirs(_inside(m, "sys")))
    _dev(m)
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", _mkdirs(_inside(m, "run")))
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", _mkdirs(_inside(m, "tmp")))
    if os.path.exists(layout.resolv_conf):
        _bind_file(layout.resolv_conf, _resolv_target(m))
    _mount("--bind", layout.lists, _mkdirs(_inside(m, "var/lib/apt/lists")))
    _mount("--bind", layout.archives, _mkdirs(_inside(m, "var/cache/apt/archives")))
    if layout.debs:
        _mount("--bind", "-o", "ro", layout.debs, _mkdirs(_inside(m, DEBS_IN_CHROOT)))
    policy = _inside(m, "usr/sbin/policy-rc.d")
    if os.path.lexists(policy):  # the base's own (or a link): replaced in the overlay only
        os.unlink(policy)
    fd = os.open(policy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(POLICY_RC_D)
    os.chmod(policy, 0o755)


def command(layout: Layout, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` in the chroot of `layout`."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-m",
        "personalityd.builder.sandbox",
        json.dumps(asdict(layout)),
        *argv,
    ]


def run(
    layout: Layout, argv: Sequence[str], timeout: float = 3600
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the chroot; stdout and stderr together in `.stdout`."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH")}
    return subprocess.run(
        command(layout, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        env=env,
    )


def main(args: Sequence[str]) -> None:
    layout = Layout(**json.loads(args[0]))
    set_up(layout)
    env_args = [f"{k}={v}" for k, v in CHROOT_ENV.items()]
    argv = ["chroot", layout.merged, "/usr/bin/env", "-i", *env_args, *args[1:]]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m personalityd.builder.sandbox LAYOUT-JSON COMMAND...")
    if not Path(json.loads(sys.argv[1])["merged"]).is_dir():
        raise SystemExit(f"{FAILURE_PREFIX}no such directory: merged")
    main(sys.argv[1:])
