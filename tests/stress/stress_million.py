"""A volume of 1,000,000 entries: probed (the walk for set-id files, capabilities and device
nodes), indexed and stacked, with a conflict against a small volume, within a generous
deadline; the time of each step and the daemon's memory are printed (`pytest -s`).

The tree is written on a tmpfs in the test's mount namespace (1,000 directories of 900 empty
files and 100 symlinks, a little over 1,000,000 entries), packed into squashfs, and the tmpfs
is unmounted again. `STRESS_MILLION_ENTRIES` makes it smaller for a quick look.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from testkit.daemon import Daemon
from testkit.images import build_image, format_os_release, pack_image
from testkit.loops import LoopDevices
from testkit.mounts import unmount_tree
from testkit.polling import wait_for

ENTRIES = int(os.environ.get("STRESS_MILLION_ENTRIES", "1000000"))
PER_DIR = 1000
FILES_PER_DIR = 900  # the rest of each directory are symlinks
DEADLINE = 3600.0  # a hang, not a figure: the figures are printed


def _write_million(src: Path, entries: int) -> int:
    """At least `entries` entries below src/usr/share/million (directories included), and a
    manifest; returns how many."""
    top = src / "usr/share/million"
    top.mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    written = 0
    for d in range(_dirs(entries)):
        directory = top / f"d{d:04d}"
        directory.mkdir()
        written += 1
        for i in range(PER_DIR):
            if i < FILES_PER_DIR:
                os.close(os.open(directory / f"f{i:04d}", flags, 0o644))
            else:
                os.symlink(f"f{i - FILES_PER_DIR:04d}", directory / f"l{i:04d}")
            written += 1
    (top / "d0000/f0000").write_bytes(b"the million's\n")
    release = src / "usr/lib/extension-release.d/extension-release.million"
    release.parent.mkdir(parents=True)
    release.write_text(format_os_release({"ID": "_any"}))
    return written


def _dirs(entries: int) -> int:
    return max(1, -(-entries // (PER_DIR + 1)))


def _peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def test_a_million_entries_are_probed_indexed_and_stacked(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, sandbox_root: Path
) -> None:
    src = tmp_path / "million.tree"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,nr_inodes=0", "tmpfs", src], check=True)
    try:
        started = time.monotonic()
        entries = _write_million(src, ENTRIES)
        image = tmp_path / "million.squashfs"
        pack_image(src, image, "squashfs", timeout=DEADLINE)
        built = time.monotonic() - started
    finally:
        unmount_tree(src)
    other = build_image(tmp_path, "small", {"usr/share/million/d0000/f0000": "the small one's\n"})
    loop_devices.attach(other)
    daemon.start()
    idle_rss, _ = _peak_rss(daemon.pid or 0)

    started = time.monotonic()
    loop_devices.attach(image)
    wait_for(
        lambda: "event=volume_found name=million" in daemon.log_text(),
        DEADLINE,
        "the million-entry volume to be probed",
    )
    probed = time.monotonic() - started

    started = time.monotonic()
    switch = {"action": "switch", "personalities": ["million", "small"], "timeout": 60}
    result = daemon.request(switch, timeout=DEADLINE)
    stacked = time.monotonic() - started
    assert result["status"] == "ok", result

    assert (sandbox_root / "usr/share/million/d0000/f0000").read_text() == "the small one's\n"
    last = f"usr/share/million/d{_dirs(ENTRIES) - 1:04d}"
    assert (sandbox_root / last / f"f{FILES_PER_DIR - 1:04d}").read_bytes() == b""
    assert os.readlink(sandbox_root / last / f"l{PER_DIR - 1:04d}") == "f0099"
    indexed = [
        line
        for line in daemon.log_text().splitlines()
        if "event=volume_indexed name=million" in line
    ]
    assert indexed, "the million-entry volume was not indexed"
    count = int(indexed[-1].split("entries=")[1].split()[0])
    assert count >= entries >= ENTRIES, (count, entries)
    rss, peak = _peak_rss(daemon.pid or 0)
    mib = 1 << 20
    print(
        f"\n{entries:,} entries: image built in {built:.1f} s "
        f"({image.stat().st_size / mib:.1f} MiB); "
        f"probed in {probed:.1f} s after the loop device appeared; switch with index, conflicts "
        f"and overlays in {stacked:.1f} s; daemon RSS {idle_rss / mib:.1f} MiB idle, "
        f"{rss / mib:.1f} MiB stacked, peak {peak / mib:.1f} MiB"
    )
    # Generous: the packed index is a few bytes per entry (docs/bench.md: 16 bytes per path).
    assert rss - idle_rss < 256 * mib, (idle_rss, rss)
