"""An image file is walked once: the probe's walk (when the file is found) also indexes it, and
the attach uses that index because the mount's content key is the probe's. A file written in
place after its probe is probed and indexed again before it is stacked, and what the stack
reports is what the new content holds."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from image_entries import install, search_dir
from sandbox_view import Images, ok, read, wait_until

from personalityd.adapters.indexer import index_volume_packed
from testkit.daemon import Daemon

TOOL = {"usr/bin/tool": "tool 1\n", "usr/share/web/a": "a\n", "etc/web.conf": "web = 1\n"}


def indexed(daemon: Daemon, name: str) -> list[str]:
    """The `volume_indexed` log lines for `name`."""
    return [
        line
        for line in daemon.log_text().splitlines()
        if f"event=volume_indexed name={name} " in line
    ]


def test_the_attach_uses_the_probes_index(
    serve: Callable[[Daemon], Daemon], daemon: Daemon, image: Images, sandbox_root: Path
) -> None:
    directory = search_dir(sandbox_root)
    install(image("web", TOOL), directory, "web.raw")
    serve(daemon)
    wait_until(lambda: "event=image_found name=web " in daemon.log_text(), daemon)
    ok(daemon.request({"action": "attach", "personality": "web"}))
    assert read(sandbox_root, "usr/bin/tool") == b"tool 1\n"
    (line,) = indexed(daemon, "web")
    assert "by=probe" in line
    mounted = index_volume_packed(str(sandbox_root / "opt/personality/web"), ("/usr", "/etc"))
    assert f"entries={sum(map(len, mounted.values()))} " in line + " "


def test_a_file_written_in_place_after_its_probe_is_probed_again(
    serve: Callable[[Daemon], Daemon], daemon: Daemon, image: Images, sandbox_root: Path
) -> None:
    directory = search_dir(sandbox_root)
    entry = directory / "web.raw"
    install(image("web", TOOL), directory, "web.raw")
    serve(daemon)
    wait_until(lambda: "event=image_found name=web " in daemon.log_text(), daemon)
    other = image("web", {**TOOL, "usr/bin/tool": "tool 2\n", "usr/bin/more": "more\n"})
    data = other.read_bytes()
    with open(entry, "r+b") as f:  # the same inode, other bytes: the probe's index is stale
        f.write(data)
        f.truncate(len(data))
    os.utime(entry)
    ok(daemon.request({"action": "attach", "personality": "web"}))
    assert "event=image_changed_before_attach name=web " in daemon.log_text()
    assert read(sandbox_root, "usr/bin/tool") == b"tool 2\n"
    assert read(sandbox_root, "usr/bin/more") == b"more\n"
    mounted = index_volume_packed(str(sandbox_root / "opt/personality/web"), ("/usr", "/etc"))
    line = indexed(daemon, "web")[-1]
    assert f"entries={sum(map(len, mounted.values()))}" in line
