"""The daemon runs from the base: at a start on a live stack it re-executes itself from below it.

A restart with a stack of ours mounted over the hierarchy that holds the daemon's interpreter,
libraries or code (`systemctl restart`, a watchdog restart, a package upgrade) would run the
root daemon from the stack: a personality shipping a newer `python3` or `libssl` would replace
what it runs, and the files it maps would pin that generation's overlay. So before anything
else the daemon looks at its own mappings; when one is on an overlay of ours, it executes
itself again through the read-only base references (`<runtime_dir>/base/<key>`): the dynamic
loader named by the interpreter, the interpreter, its library path, its locale and gconv
data, and the daemon's script, each resolved inside the base, symlinks included. The second
process checks again and only logs if something is still mapped from a stack.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from personalityd.adapters.mountinfo import MountEntry, is_our_overlay, read_mountinfo

log = structlog.get_logger()

REEXEC_ENV = "PERSONALITYD_FROM_BASE"
MAX_SYMLINKS = 40
PT_INTERP = 3


def parse_maps(text: str) -> list[tuple[tuple[int, int], str]]:
    """(device, path) of each file mapping in a /proc/PID/maps text."""
    mapped: list[tuple[tuple[int, int], str]] = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        major, _, minor = fields[3].partition(":")
        try:
            mapped.append(((int(major, 16), int(minor, 16)), fields[5].removesuffix(" (deleted)")))
        except ValueError:
            continue
    return mapped


def our_overlays(entries: Iterable[MountEntry]) -> dict[str, MountEntry]:
    """Overlays of ours by mount point."""
    return {e.mount_point: e for e in entries if is_our_overlay(e)}


def mapped_from_stack(maps_text: str, overlays: Iterable[MountEntry]) -> list[str]:
    devices = {e.devnum for e in overlays}
    return sorted({path for device, path in parse_maps(maps_text) if device in devices})


def program_headers(
    f: BinaryIO, header: bytes
) -> tuple[str, bool, list[tuple[int, int, int, int]]]:
    """(byte order, 64-bit, [(type, offset, vaddr, filesz)]) of an ELF's program headers;
    `header` is the file's first 64 bytes."""
    wide, endian = header[4] == 2, "<" if header[5] == 1 else ">"
    if wide:
        (phoff,) = struct.unpack_from(endian + "Q", header, 32)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 54)
    else:
        (phoff,) = struct.unpack_from(endian + "I", header, 28)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 42)
    found = []
    for i in range(min(phnum, 256)):
        f.seek(phoff + i * phentsize)
        entry = f.read(phentsize)
        if len(entry) < (56 if wide else 32):
            break  # truncated: what was read is all there is
        if wide:
            p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(
                endian + "IIQQQQ", entry, 0
            )
        else:
            p_type, offset, vaddr, _paddr, filesz = struct.unpack_from(endian + "IIIII", entry, 0)
        found.append((p_type, offset, vaddr, filesz))
    return endian, wide, found


def elf_interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP) of an ELF executable, or None."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return None
        for p_type, offset, _vaddr, size in program_headers(f, header)[2]:
            if p_type == PT_INTERP:
                f.seek(offset)
                return f.read(min(size, 4096)).rstrip(b"\0").decode()
    return None


@dataclass(frozen=True)
class BaseResolver:
    """Resolves a path as the system saw it before anything was stacked: below each stacked
    hierarchy through its base reference, symlinks followed one component at a time (an
    absolute target starts again from `/`, so it is resolved in the base too)."""

    references: Mapping[str, str]  # hierarchy mount point -> its read-only base reference

    def physical(self, logical: str) -> str:
        for hierarchy, reference in self.references.items():
            if logical == hierarchy or logical.startswith(hierarchy + "/"):
                return reference + logical[len(hierarchy) :]
        return logical

    def resolve(self, path: str) -> str:
        pending = [p for p in os.path.normpath(path).split("/") if p]
        logical = "/"
        followed = 0
        while pending:
            part = pending.pop(0)
            candidate = os.path.normpath(os.path.join(logical, part))
            physical = self.physical(candidate)
            if not stat.S_ISLNK(os.lstat(physical).st_mode):
                logical = candidate
                continue
            followed += 1
            if followed > MAX_SYMLINKS:
                raise OSError(40, "too many levels of symbolic links", path)
            target = os.readlink(physical)
            restart = target if target.startswith("/") else os.path.join(logical, target)
            pending = [p for p in os.path.normpath(restart).split("/") if p] + pending
            logical = "/"
        return self.physical(logical)

    def directories(self, paths: Iterable[str]) -> list[str]:
        """`paths` resolved in the base, in order, without those that are not directories
        there (or cannot be resolved) and without repeats."""
        found: list[str] = []
        for path in paths:
            try:
                resolved = self.resolve(path)
            except OSError:
                continue
            if os.path.isdir(resolved) and resolved not in found:
                found.append(resolved)
        return found


def _script_arguments(arguments: Sequence[str], resolver: BaseResolver) -> list[str]:
    """The interpreter's own arguments with its script path resolved in the base (options up
    to the script or `-m`/`-c` are kept as they are)."""
    result = list(arguments)
    for i, argument in enumerate(result):
        if argument in ("-m", "-c") or argument == "-":
            break
        if not argument.startswith("-"):
            result[i] = resolver.resolve(argument)
            break
    return result


def reexec_command(
    resolver: BaseResolver, executable: str, orig_argv: Sequence[str], multiarch: str
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that run this interpreter and its script from the base."""
    program = resolver.resolve(executable)
    interpreter = elf_interpreter(program)
    prefix = os.path.dirname(os.path.dirname(executable))  # /usr for /usr/bin/python3
    library_path = resolver.directories(
        (
            f"{prefix}/lib/{multiarch}",
            f"{prefix}/lib",
            f"/usr/lib/{multiarch}",
            f"/lib/{multiarch}",
            "/usr/lib",
            "/lib",
        )
    )
    argv = [program, *_script_arguments(orig_argv[1:], resolver)]
    if interpreter is not None:
        argv = [resolver.resolve(interpreter), "--library-path", ":".join(library_path), *argv]
    environment = {REEXEC_ENV: "1"}
    for variable, directory in (
        ("LOCPATH", "/usr/lib/locale"),
        ("GCONV_PATH", f"/usr/lib/{multiarch}/gconv"),
    ):
        try:
            resolved = resolver.resolve(directory)
        except OSError:
            continue
        if os.path.isdir(resolved):
            environment[variable] = resolved
    return argv, environment


def _read_maps() -> str:
    with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def run_from_base(references: Mapping[str, str]) -> None:
    """Re-execute from the base when something of this process is mapped from a stack of
    ours; `references` maps each hierarchy's mount point to its base reference. Returns when
    nothing is (or when it cannot be helped: then it logs why)."""
    overlays = our_overlays(read_mountinfo())
    stacked = mapped_from_stack(_read_maps(), overlays.values())
    if not stacked:
        return
    if os.environ.get(REEXEC_ENV) == "1":
        log.warning("running_from_stack", files=stacked[:5], count=len(stacked))
        return
    usable = {h: ref for h, ref in references.items() if h in overlays and os.path.isdir(ref)}
    try:
        argv, extra = reexec_command(
            BaseResolver(usable),
            os.readlink("/proc/self/exe"),
            sys.orig_argv,
            getattr(sys.implementation, "_multiarch", ""),
        )
    except OSError as exc:
        log.warning("reexec_from_base_impossible", error=str(exc), files=stacked[:5])
        return
    log.info("reexec_from_base", argv=" ".join(argv), stacked=len(stacked))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **extra})
