"""Running from the base: the pure parts of re-executing below a stack (adapters/selfexec.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from personalityd.adapters.mountinfo import parse_mountinfo
from personalityd.adapters.selfexec import (
    BaseResolver,
    elf_interpreter,
    mapped_from_stack,
    our_overlays,
    parse_maps,
    reexec_command,
)

MAPS = """\
55d0c5a00000-55d0c5a2e000 r--p 00000000 00:2a 1234  /usr/bin/python3.11
7f00a0000000-7f00a0021000 rw-p 00000000 00:00 0
7f00a1000000-7f00a1200000 r--p 00000000 fe:01 777  /usr/lib/x86_64-linux-gnu/libc.so.6
7f00a2000000-7f00a2010000 r-xp 00000000 00:2a 99   /usr/lib/python3.11/lib-dynload/_ssl.so (deleted)
7ffd1000000-7ffd1021000 rw-p 00000000 00:00 0  [stack]
"""
MOUNTINFO = """\
1 0 254:1 / / rw - ext4 /dev/vda1 rw
40 1 0:42 / /usr rw - overlay personalityd ro,lowerdir+=/run/x
41 1 0:43 / /srv rw - overlay overlay rw
"""


def test_mappings_on_our_overlays_are_found_and_others_not() -> None:
    assert parse_maps(MAPS)[0] == ((0, 42), "/usr/bin/python3.11")
    overlays = our_overlays(parse_mountinfo(MOUNTINFO))
    assert list(overlays) == ["/usr"]
    assert mapped_from_stack(MAPS, overlays.values()) == [
        "/usr/bin/python3.11",
        "/usr/lib/python3.11/lib-dynload/_ssl.so",
    ]


def test_the_interpreter_of_a_real_executable() -> None:
    interpreter = elf_interpreter(os.path.realpath(sys.executable))
    assert interpreter is not None and os.path.exists(interpreter)
    assert elf_interpreter(__file__) is None


def test_symlinks_are_resolved_inside_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base-usr"
    (base / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (base / "lib/x86_64-linux-gnu/ld.so").write_text("loader")
    (base / "bin").mkdir()
    (base / "bin/python3.11").write_text("python")
    (base / "bin/python3").symlink_to("python3.11")
    # an absolute target starts again from /, and /usr is still the base there
    (base / "lib/ld-abs.so").symlink_to("/usr/lib/x86_64-linux-gnu/ld.so")
    resolver = BaseResolver({"/usr": str(base)})
    assert resolver.resolve("/usr/bin/python3") == f"{base}/bin/python3.11"
    assert resolver.resolve("/usr/lib/ld-abs.so") == f"{base}/lib/x86_64-linux-gnu/ld.so"
    assert resolver.resolve("/etc") == "/etc"


def test_the_command_runs_loader_interpreter_and_script_from_the_base(tmp_path: Path) -> None:
    real = os.path.realpath(sys.executable)
    base = tmp_path / "base"
    (base / "bin").mkdir(parents=True)
    (base / "bin/python").symlink_to(real)  # out of the base, as a real tree may link
    (base / "bin/personalityd").write_text("#!/usr/bin/python3\n")
    (base / "lib").mkdir()
    resolver = BaseResolver({"/stacked": str(base)})
    argv, environment = reexec_command(
        resolver,
        "/stacked/bin/python",
        ["/stacked/bin/python", "-I", "/stacked/bin/personalityd", "--root", "/stacked"],
        "x86_64-linux-gnu",
    )
    assert argv[1] == "--library-path" and f"{base}/lib" in argv[2].split(":")
    assert argv[3:] == [real, "-I", f"{base}/bin/personalityd", "--root", "/stacked"]
    assert environment["PERSONALITYD_FROM_BASE"] == "1"
