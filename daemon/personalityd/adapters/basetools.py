"""The base's own tools, run by the root daemon without anything of a stack in them.

A personality may ship its own `/usr/bin/systemd-sysusers` or `libsystemd-shared`; the daemon
runs as root, so the tools it runs for the stack (adapters/declarations.py) are taken from the
system as it is below every stack of ours, the way adapters/selfexec.py re-executes the
daemon: the program is resolved through the read-only base references, and a dynamically
linked one is started by the base's ELF interpreter with a library path made only of base
directories (its RUNPATH first) and without the linker's cache (`/etc/ld.so.cache` lists the
stack's libraries too). A static program (Debian's `ldconfig.real`) runs as it is; a script
is never run (its interpreter would come from the stack).
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from personalityd.adapters.selfexec import BaseResolver, elf_interpreter, program_headers

PT_LOAD = 1
PT_DYNAMIC = 2
DT_NULL, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 5, 15, 29
TOOL_TIMEOUT = 120.0
OUTPUT_LIMIT = 2000
ENVIRONMENT = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "SYSTEMD_LOG_TARGET": "console",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}


class ToolUnavailable(Exception):
    """No usable program for a tool in the base (the message says what was looked at)."""


@dataclass(frozen=True)
class ToolOutcome:
    returncode: int
    output: str  # stdout and stderr, stripped, at most OUTPUT_LIMIT characters


def elf_runpath(path: str) -> list[str]:
    """The DT_RUNPATH (else DT_RPATH) directories of an ELF file; [] when it has none."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return []
        endian, wide, segments = program_headers(f, header)
        dynamic = [s for s in segments if s[0] == PT_DYNAMIC]
        if not dynamic:
            return []
        _t, offset, _v, size = dynamic[0]
        f.seek(offset)
        data = f.read(min(size, 65536))
        fmt, step = (endian + "qQ", 16) if wide else (endian + "iI", 8)
        strtab, wanted = None, {}
        for i in range(0, len(data) - step + 1, step):
            tag, value = struct.unpack_from(fmt, data, i)
            if tag == DT_NULL:
                break
            if tag == DT_STRTAB:
                strtab = value
            elif tag in (DT_RPATH, DT_RUNPATH):
                wanted[tag] = value
        if strtab is None or not wanted:
            return []
        base = None
        for p_type, p_offset, vaddr, filesz in segments:
            if p_type == PT_LOAD and vaddr <= strtab < vaddr + filesz:
                base = p_offset + (strtab - vaddr)
        if base is None:
            return []
        f.seek(base + wanted.get(DT_RUNPATH, wanted.get(DT_RPATH, 0)))
        text = f.read(4096).split(b"\0", 1)[0].decode(errors="replace")
    return [d for d in text.split(":") if d]


@dataclass(frozen=True)
class BaseTools:
    """Runs programs of the base. `references` maps each stacked hierarchy's mount point (as
    the daemon sees it) to its read-only base reference."""

    references: Mapping[str, str]
    multiarch: str

    def command(self, candidates: Sequence[str], args: Sequence[str]) -> list[str]:
        """The argv that runs the first usable candidate from the base, with `args`."""
        resolver = BaseResolver(self.references)
        reasons = []
        for logical in candidates:
            try:
                program = resolver.resolve(logical)
                st = os.stat(program)
            except OSError as exc:
                reasons.append(f"{logical}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
                reasons.append(f"{logical}: not an executable file")
                continue
            with open(program, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    reasons.append(f"{logical}: not an ELF executable (a script is not run)")
                    continue
            interpreter = elf_interpreter(program)
            if interpreter is None:  # static
                return [program, *args]
            library_path = self._library_path(resolver, logical, program)
            return [
                resolver.resolve(interpreter),
                "--inhibit-cache",
                "--library-path",
                ":".join(library_path),
                program,
                *args,
            ]
        raise ToolUnavailable("no usable program in the base: " + "; ".join(reasons))

    def _library_path(self, resolver: BaseResolver, logical: str, program: str) -> list[str]:
        origin = os.path.dirname(logical)
        directories = [d.replace("$ORIGIN", origin) for d in elf_runpath(program)]
        arch = self.multiarch
        directories += [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
        directories += ["/usr/lib64", "/lib64", "/usr/lib", "/lib"]
        return resolver.directories(d for d in directories if d.startswith("/"))

    def run(self, candidates: Sequence[str], args: Sequence[str]) -> ToolOutcome:
        """Run it (blocking: call from a worker thread). Raises ToolUnavailable."""
        argv = self.command(candidates, args)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=ENVIRONMENT,
                cwd="/",
                timeout=TOOL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ToolOutcome(-1, f"did not finish within {TOOL_TIMEOUT:.0f} s")
        except OSError as exc:
            raise ToolUnavailable(f"cannot run {argv[0]}: {exc}") from exc
        output = proc.stdout.decode(errors="replace").strip()
        return ToolOutcome(proc.returncode, output[-OUTPUT_LIMIT:])
