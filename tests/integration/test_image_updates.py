"""Image files over time: an entry replaced (renamed over, or its symlink moved to a new
version) leaves the attached content alone until Refresh, which re-attaches every updated
personality in one transaction, with readers seeing the old content or the new, never nothing;
kill -9 and a restart adopt the daemon's own loop devices and release those no longer needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from image_entries import install, loops_backed_under, search_dir
from sandbox_view import SUMMARY, Images, ok, read, state_generation, wait_until
from test_stack import READER

from testkit.daemon import Daemon
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.polling import wait_for


def found(daemon: Daemon, name: str) -> int:
    """How often the daemon found (probed) an entry for `name`."""
    return daemon.log_text().count(f"event=image_found name={name} ")


def refresh(daemon: Daemon) -> None:
    """`personalityctl refresh` on the daemon's bus."""
    env = {**os.environ, **daemon.env}
    proc = subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", "refresh"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_refresh_reattaches_updated_files_in_one_transaction(
    serve: Callable[[Daemon], Daemon], daemon: Daemon, image: Images, sandbox_root: Path,
    tmp_path: Path, journal: JournalReader,
) -> None:  # fmt: skip
    directory = search_dir(sandbox_root)
    install(image("web", {"usr/bin/shared": "blue"}), directory, "web.raw")
    install(image("app", {"usr/bin/app": "app 1"}), directory, "app_1.raw")
    os.symlink("app_1.raw", directory / "app.raw")
    serve(daemon)
    ok(daemon.request({"action": "switch", "personalities": ["web", "app"]}))
    before = state_generation(daemon)
    assert len(loops_backed_under(sandbox_root)) == 2

    stop, seen = tmp_path / "stop-reader", tmp_path / "reader-saw"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(sandbox_root / "usr/bin/shared"), "blue,green",
         str(stop), str(seen)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: seen.exists() and seen.read_text().splitlines()[-1:] == ["blue"], daemon)
        # Updates: a new file renamed over one entry, the other's symlink moved to a new version.
        install(image("web", {"usr/bin/shared": "green"}), directory, "web.raw")
        install(image("app", {"usr/bin/app": "app 2"}), directory, "app_2.raw")
        os.symlink("app_2.raw", directory / ".app.raw.new")
        os.replace(directory / ".app.raw.new", directory / "app.raw")
        wait_until(lambda: found(daemon, "web") == 2 and found(daemon, "app") == 2, daemon)
        assert read(sandbox_root, "usr/bin/shared") == b"blue"  # untouched until Refresh
        assert read(sandbox_root, "usr/bin/app") == b"app 1"
        assert state_generation(daemon) == before
        refresh(daemon)
        assert read(sandbox_root, "usr/bin/shared") == b"green"
        assert read(sandbox_root, "usr/bin/app") == b"app 2"
        assert state_generation(daemon) == before + 1
        wait_until(lambda: seen.read_text().splitlines()[-1:] == ["green"], daemon)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    reads, errors = map(int, out.split())
    assert errors == 0, f"{errors} of {reads} reads failed or saw other content"
    assert daemon.pid is not None  # other daemons on this host write to the same journal
    summaries = journal.entries(SUMMARY, PERSONALITY_GENERATION=before + 1, _PID=daemon.pid)
    assert summaries[0]["PERSONALITY_ATTACHED"] == "web app"
    # The old loops go once the old generation is released; the new ones stay.
    wait_for(
        lambda: sorted(r["back-file"] for r in loops_backed_under(sandbox_root))
        == sorted([str(directory / "web.raw"), str(directory / "app_2.raw")]),
        timeout=120, what="the old loop devices released",
    )  # fmt: skip
    # A Refresh with nothing updated changes nothing.
    refresh(daemon)
    assert state_generation(daemon) == before + 1


def test_kill9_then_restart_adopts_own_loops_and_releases_the_rest(
    daemon: Daemon, image: Images, sandbox_root: Path
) -> None:
    directory = search_dir(sandbox_root)
    install(image("web", {"usr/bin/web": "web"}), directory, "web.raw")
    install(image("db", {"usr/bin/db": "db"}), directory, "db.raw")
    daemon.start()
    ok(daemon.request({"action": "switch", "personalities": ["web", "db"]}))
    loops = {r["name"]: r["back-file"] for r in loops_backed_under(sandbox_root)}
    assert len(loops) == 2
    daemon.kill9()
    # While it is down: the admin replaces web.raw and drops db from the desired list.
    install(image("web", {"usr/bin/web": "web 2"}), directory, "web.raw")
    state_file = daemon.state_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["desired"] = [e for e in state["desired"] if e["name"] == "web"]
    state_file.write_text(json.dumps(state))
    daemon.start()
    wait_until(lambda: not (sandbox_root / "usr/bin/db").exists(), daemon)
    # web keeps its loop (the very device, on the old file) until Refresh; db's is released.
    assert read(sandbox_root, "usr/bin/web") == b"web"
    wait_for(
        lambda: [r["name"] for r in loops_backed_under(sandbox_root)]
        == [n for n, f in loops.items() if f.endswith("web.raw")],
        timeout=120, what="db's loop released, web's adopted",
    )  # fmt: skip
    ok(daemon.request({"action": "detach", "personality": "web"}))
    wait_for(lambda: loops_backed_under(sandbox_root) == [], timeout=120, what="all released")
    daemon.stop()


def test_a_new_winner_reaches_an_attached_personality_at_refresh(
    serve: Callable[[Daemon], Daemon], daemon: Daemon, loop_devices: LoopDevices, image: Images,
    sandbox_root: Path,
) -> None:  # fmt: skip
    directory = search_dir(sandbox_root)
    install(image("web", {"usr/bin/which": "file"}), directory, "web.raw")
    serve(daemon)
    ok(daemon.request({"action": "attach", "personality": "web"}))
    assert read(sandbox_root, "usr/bin/which") == b"file"
    loop_devices.attach(image("web", {"usr/bin/which": "device"}))  # block devices come first
    wait_until(lambda: "event=volume_found name=web" in daemon.log_text(), daemon)
    assert read(sandbox_root, "usr/bin/which") == b"file"  # the attached one stays, until:
    refresh(daemon)
    assert read(sandbox_root, "usr/bin/which") == b"device"
    wait_for(lambda: loops_backed_under(directory) == [], timeout=120, what="file's loop released")
