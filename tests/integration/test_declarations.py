"""A personality's declarations applied at attach (docs/system.md, "Declarations"): its
sysusers.d users, its tmpfiles.d lines (a `C` line from usr/share/factory), the linker's
cache made again when it ships a library and again after it left; always with the tools of
the system the daemon runs on, never the ones a personality ships; a failure journalled while
the stack stays. Observed from outside: the sandbox's /etc/passwd, /var, ld.so.cache, and the
journal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandbox_view import Images, ok, read

from testkit.daemon import Daemon
from testkit.journal import JournalReader
from testkit.loops import LoopDevices

DECLARATION_FAILED = "eb76d494c8d94ecdbe827d8221d1e6dc"
MULTIARCH = getattr(sys.implementation, "_multiarch", "x86_64-linux-gnu")
HOST_LIBRARY = Path(f"/usr/lib/{MULTIARCH}/libz.so.1")


def fake_tool(marker: Path) -> bytes:
    """A program a personality might ship under a tool's name: it leaves `marker` if run."""
    return f'#!/bin/sh\necho ran "$0" >> {marker}\nexit 0\n'.encode()


def cached_libraries(root: Path) -> str:
    cache = root / "etc/ld.so.cache"
    if not cache.exists():
        return ""
    return subprocess.run(
        ["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True
    ).stdout


def test_users_var_content_and_linker_cache_come_from_the_declarations(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "personality-tool-ran"
    lib_dir = f"usr/lib/{MULTIARCH}"
    loop_devices.attach(
        image(
            "decl",
            {
                "usr/lib/sysusers.d/decl.conf": 'u decl-svc - "decl service" /var/lib/decl\n',
                "usr/lib/tmpfiles.d/decl.conf": (
                    "d /var/lib/decl 0750 decl-svc decl-svc -\n"
                    "C /var/lib/decl/seed - - - - /usr/share/factory/var/lib/decl/seed\n"
                ),
                "usr/share/factory/var/lib/decl/seed": b"seeded by tmpfiles\n",
                f"{lib_dir}/libz.so.1": HOST_LIBRARY.read_bytes(),
                # What it ships under the tools' names is never what the daemon runs.
                "usr/bin/systemd-sysusers": fake_tool(marker),
                "usr/bin/systemd-tmpfiles": fake_tool(marker),
                "usr/sbin/ldconfig": fake_tool(marker),
                "usr/sbin/ldconfig.real": fake_tool(marker),
            },
        )
    )
    daemon.start()
    assert "libz.so.1" not in cached_libraries(sandbox_root)

    ok(daemon.request({"action": "attach", "personality": "decl"}))

    # Applied before the answer: the user, the directory owned by it, the file from factory.
    passwd = (sandbox_root / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    assert "decl-svc" in users, passwd
    uid = int(users["decl-svc"][2])
    st = os.stat(sandbox_root / "var/lib/decl")
    assert (st.st_uid, st.st_mode & 0o7777) == (uid, 0o750)
    assert read(sandbox_root, "var/lib/decl/seed") == b"seeded by tmpfiles\n"
    cache = cached_libraries(sandbox_root)
    assert f"/{lib_dir}/libz.so.1" in cache, cache
    assert not marker.exists(), marker.read_text()
    log = daemon.log_text()
    assert "event=declarations_applied" in log
    assert "declaration_failed" not in log

    ok(daemon.request({"action": "detach", "personality": "decl"}))
    # The cache is made again once it left: its library is no longer listed.
    assert "libz.so.1" not in cached_libraries(sandbox_root)
    assert not marker.exists()


def test_a_failed_declaration_is_journalled_and_the_stack_stays(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(
        image(
            "broken",
            {
                "usr/lib/sysusers.d/broken.conf": "x not-a-sysusers-line\n",
                "usr/lib/tmpfiles.d/broken.conf": "d /var/lib/broken 0755 root root -\n",
                "usr/share/broken/data": b"still stacked\n",
            },
        )
    )
    daemon.start()
    result = ok(daemon.request({"action": "attach", "personality": "broken"}))

    assert read(sandbox_root, "usr/share/broken/data") == b"still stacked\n"
    # The next declaration was still applied.
    assert (sandbox_root / "var/lib/broken").is_dir()
    (entry,) = journal.entries(DECLARATION_FAILED, PERSONALITY_NAME="broken", _PID=str(daemon.pid))
    assert entry["PERSONALITY_TOOL"] == "systemd-sysusers"
    assert entry["PERSONALITY_GENERATION"] == str(result["generation"])
    assert entry["PERSONALITY_COMMAND"].startswith("systemd-sysusers --root=")
    assert entry["PERSONALITY_COMMAND"].endswith("/usr/lib/sysusers.d/broken.conf")
    reason = entry["PERSONALITY_REASON"]
    assert reason.startswith("systemd-sysusers exited with status"), reason
    assert "broken.conf" in reason, reason  # the tool's own message
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("Declarations of 'broken' not applied at generation")
    assert "event=declaration_failed" in daemon.log_text()


def test_a_failed_declaration_fails_a_trial(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    files = {"usr/lib/sysusers.d/broken.conf": "x not-a-sysusers-line\n", "usr/share/b": "b"}
    loop_devices.attach(image("broken", files))
    daemon.start()
    result = daemon.request({"action": "attach", "personality": "broken", "confirm": 60})
    assert (result["_dir"], result["code"]) == ("failed", "rolled-back")
    assert "(systemd-sysusers of 'broken': not applied)" in result["message"]
    assert not (sandbox_root / "usr/share/b").exists()
