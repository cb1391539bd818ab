"""What a personality declares instead of running maintainer scripts, and the commands that
apply it (docs/system.md, "Declarations"): its sysusers.d and tmpfiles.d files, and whether
the dynamic linker's cache must be made again because it ships shared libraries.

Pure: the adapter (adapters/declarations.py) reads a volume's tree into `Declarations` and
runs the `ToolRun`s planned here with the base's own tools (adapters/basetools.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SYSUSERS_DIR = "usr/lib/sysusers.d"
TMPFILES_DIR = "usr/lib/tmpfiles.d"
LDCONF_DIR = "etc/ld.so.conf.d"

# The tools, as paths of the system the daemon runs on; each is resolved below any stack of
# ours (the first that exists and is an ELF executable is run). Debian's /sbin/ldconfig is a
# shell script around the static ldconfig.real: the script would run the stack's /bin/sh.
SYSUSERS = "systemd-sysusers"
TMPFILES = "systemd-tmpfiles"
LDCONFIG = "ldconfig"
TOOL_PATHS: dict[str, tuple[str, ...]] = {
    SYSUSERS: ("/usr/bin/systemd-sysusers", "/bin/systemd-sysusers"),
    TMPFILES: ("/usr/bin/systemd-tmpfiles", "/bin/systemd-tmpfiles"),
    LDCONFIG: (
        "/usr/sbin/ldconfig.real",
        "/sbin/ldconfig.real",
        "/usr/sbin/ldconfig",
        "/sbin/ldconfig",
    ),
}

_SHARED_LIBRARY = re.compile(r"^[^/]+\.so(\.[0-9A-Za-z_.-]*)?$")
_CONF = re.compile(r"^[^/.][^/]*\.conf$")


def library_dirs(multiarch: str) -> tuple[str, ...]:
    """The directories (relative to a volume's root) where a shared library is one that the
    dynamic linker's cache lists."""
    dirs = ["usr/lib", "usr/lib64", "usr/local/lib", "lib", "lib64"]
    if multiarch:
        dirs += [f"usr/lib/{multiarch}", f"lib/{multiarch}", f"usr/local/lib/{multiarch}"]
    return tuple(dirs)


def is_shared_library(name: str) -> bool:
    """`libfoo.so`, `libfoo.so.1`, `libfoo.so.1.2.3`."""
    return _SHARED_LIBRARY.match(name) is not None


def is_conf_file(name: str) -> bool:
    """A configuration file name as systemd reads them from a .d directory (`*.conf`, no
    hidden files)."""
    return _CONF.match(name) is not None


@dataclass(frozen=True)
class Declarations:
    """One personality's declarations, as found in its own tree (file names, sorted)."""

    name: str
    sysusers: tuple[str, ...] = ()
    tmpfiles: tuple[str, ...] = ()
    libraries: bool = False  # shared libraries in a library directory, or ld.so.conf.d files

    @property
    def empty(self) -> bool:
        return not (self.sysusers or self.tmpfiles or self.libraries)


@dataclass(frozen=True)
class ToolRun:
    """One command: `tool` (a key of TOOL_PATHS) with `args`, for `personality` ("" when it is
    for the stack as a whole: ldconfig after personalities left)."""

    tool: str
    args: tuple[str, ...]
    personality: str

    def describe(self) -> str:
        return " ".join((self.tool, *self.args))


def _stacked(root: str, relative: str) -> str:
    """A path of the stacked system, as the tools must read it (through the stack)."""
    return f"{root.rstrip('/')}/{relative}"


def plan_runs(root: str, arriving: Sequence[Declarations], libraries_left: bool) -> list[ToolRun]:
    """The commands for one change, in order: the users and groups of every arriving
    personality first (tmpfiles lines may name them), then their tmpfiles lines, then one
    ldconfig when an arriving personality ships libraries or one that left did.

    The files are given by their paths in the stacked tree (`<root>/usr/lib/...`), so the
    tools read what the stack shows there; with a sandbox `root` the tools are told to work
    on it (`--root`, `ldconfig -r`)."""
    in_root = () if root.rstrip("/") == "" else (f"--root={root}",)
    runs: list[ToolRun] = []
    for d in arriving:
        if d.sysusers:
            files = tuple(_stacked(root, f"{SYSUSERS_DIR}/{f}") for f in d.sysusers)
            runs.append(ToolRun(SYSUSERS, (*in_root, *files), d.name))
    for d in arriving:
        if d.tmpfiles:
            files = tuple(_stacked(root, f"{TMPFILES_DIR}/{f}") for f in d.tmpfiles)
            runs.append(ToolRun(TMPFILES, ("--create", *in_root, *files), d.name))
    with_libraries = [d.name for d in arriving if d.libraries]
    if with_libraries or libraries_left:
        # -X: no links made in the library directories (the stack is not ours to write).
        args = ("-X",) if not in_root else ("-X", "-r", root)
        runs.append(ToolRun(LDCONFIG, args, " ".join(with_libraries)))
    return runs
