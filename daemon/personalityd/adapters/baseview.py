"""What the daemon trusts, read from the base as it was before anything was stacked on it.

The configuration and the base's os-release decide what the daemon accepts (spool owners,
mount options, compatibility), so they must never come from a personality: with `root = "/"`
the files live in `/etc` and `/usr`, where a personality's overlay may be mounted already (a
restart with the stack in place).

The rule needs no configuration (which would be circular: `runtime_dir`, `hierarchies` and
`root` are configured), only the mount table: when `/proc/self/mountinfo` shows no overlay of
ours (fs type `overlay`, source `personalityd`, as stack/engine.py mounts them), the files are
read where they are. Otherwise they are read by a forked child in a mount namespace of its
own, made private first so that nothing it does propagates anywhere, in which every overlay of
ours is unmounted: there, every path (symlinks, other mounts below a hierarchy included)
resolves exactly as before the first stack. The child hands back what it read and exits; its
namespace, and everything in it, goes with it. The system's mounts are never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from personalityd.adapters import mounts
from personalityd.adapters.mountinfo import is_our_overlay, mounts_at, read_mountinfo
from personalityd.config import Config, Sources, absolute_root, build_config, read_config_sources
from personalityd.core.errors import ConfigError

OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")  # under root, first found

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MAX_UNMOUNTS = 1000  # a bound on the child's loop, far above any real number of stacks

T = TypeVar("T")


class BaseUnreachable(ConfigError):
    """The base could not be reached below the stacks; the daemon does not start."""


@dataclass(frozen=True)
class BaseSettings:
    config: Config
    warnings: list[str]  # unknown keys, naming file and key
    os_release: str | None  # the text of the base's os-release, None when it has none


def load_base_settings(config_file: str | None, root_override: str | None) -> BaseSettings:
    """The configuration (config.py) and the os-release of the base under its `root`, both
    read from the base as it was before anything was stacked (`in_base`). Raises
    ConfigError."""
    root = absolute_root(root_override)

    def read() -> tuple[Sources, str | None]:
        sources = read_config_sources(config_file, root)
        config, _ = build_config(sources, root)  # where os-release is: under the root
        return sources, read_os_release(config.root)

    sources, os_release = in_base(read)
    config, warnings = build_config(sources, root)
    return BaseSettings(config, warnings, os_release)


def read_os_release(root: Path) -> str | None:
    """`<root>/etc/os-release`, else `<root>/usr/lib/os-release`; None when neither reads."""
    for candidate in OS_RELEASE_FILES:
        try:
            return (root / candidate.lstrip("/")).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
    return None


def in_base(function: Callable[[], T]) -> T:
    """`function()` where no overlay of ours covers anything: called directly when none is
    mounted, else in a forked child (see the module docstring). Its result (or exception)
    must pickle. Raises BaseUnreachable when the child cannot set up its namespace."""
    if not any(is_our_overlay(e) for e in read_mountinfo()):
        return function()
    if os.geteuid() != 0:
        raise BaseUnreachable(
            "a personality stack is mounted, and reading the configuration from the base "
            "below it needs root"
        )
    return _in_child(function)


def _in_child(function: Callable[[], T]) -> T:
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise BaseUnreachable(f"cannot start the process that reads the base: {exc}") from None
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(function, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise BaseUnreachable(
            f"the process reading the base below the stacks ended without an answer "
            f"(wait status {status})"
        )
    outcome, value = pickle.loads(data)  # from our own child: trusted
    if outcome == "error":
        raise value
    result: T = value
    return result


def _child(function: Callable[[], T], write_end: int) -> None:
    code = 0
    try:
        try:
            _leave_the_stacks()
            answer: tuple[str, object] = ("ok", function())
        except BaseException as exc:
            answer = ("error", exc)
        try:
            data = pickle.dumps(answer)
        except Exception as exc:
            data = pickle.dumps(("error", BaseUnreachable(f"cannot hand back: {exc}")))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _leave_the_stacks() -> None:
    """In this (forked) process only: a private mount namespace without our overlays."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        error = ctypes.get_errno()
        raise BaseUnreachable(f"cannot make a mount namespace: {os.strerror(error)}")
    try:
        # Before anything else: nothing done here may propagate to another namespace.
        mounts.mount(None, "/", None, MS_REC | mounts.MS_PRIVATE, "")
    except OSError as exc:
        raise BaseUnreachable(f"cannot make the mount namespace private: {exc}") from None
    if _propagating():
        raise BaseUnreachable("the private mount namespace still propagates mounts")
    for _ in range(MAX_UNMOUNTS):
        entries = read_mountinfo()
        covered = [e.mount_point for e in entries if is_our_overlay(e)]
        if not covered:
            return
        # The deepest first, so that no mount point vanishes with a stack above it; there,
        # everything from our lowest overlay up (a lazy unmount takes the top one).
        point = max(covered, key=lambda p: (p.count("/"), p))
        stack = mounts_at(entries, point)
        first = next(i for i, e in enumerate(stack) if is_our_overlay(e))
        try:
            for _ in stack[first:]:
                mounts.unmount(point)
        except OSError as exc:
            message = f"cannot unmount the stack on {point} to read below it: {exc}"
            raise BaseUnreachable(message) from None
    raise BaseUnreachable("overlays of personalityd are still mounted after unmounting them")


def _propagating() -> bool:
    """Whether any mount of this namespace is still a shared or slave one."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            try:
                optional = fields[6 : fields.index("-", 6)]
            except ValueError:
                continue
            if any(o.startswith(("shared:", "master:")) for o in optional):
                return True
    return False
