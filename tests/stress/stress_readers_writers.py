"""Concurrent readers and writers through the stacked /etc during switches: no write that the
writer saw acknowledged (write + fsync + close returned) is lost, and readers see no error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testkit.daemon import Daemon
from testkit.images import build_image, build_writable_image
from testkit.loops import LoopDevices
from testkit.polling import wait_for
from testkit.stack import expect_clean_work_dirs, expect_stack, files_of

SWITCHES = int(os.environ.get("STRESS_SWITCHES", "100"))

WRITER = r"""
import json, os, sys
root, stop, ack = sys.argv[1], sys.argv[2], sys.argv[3]
errors = {}
n = 0
with open(ack, "w") as acks:
    while not os.path.exists(stop):
        path = os.path.join(root, "etc", "stress", f"w-{n:06d}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"write {n}\n".encode() * 4)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            errors[exc.strerror] = errors.get(exc.strerror, 0) + 1
        else:
            acks.write(f"{n}\n")
            acks.flush()
        n += 1
print(json.dumps({"attempts": n, "errors": errors}))
"""

# Creates READY once it has read every path once.
READER = r"""
import json, os, sys
paths, stop, ready = sys.argv[1].split(":"), sys.argv[2], sys.argv[3]
reads, errors, first = 0, {}, {}
while not os.path.exists(stop):
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            errors[exc.strerror] = errors.get(exc.strerror, 0) + 1
        else:
            if first.setdefault(path, data) != data:
                errors["changed content"] = errors.get("changed content", 0) + 1
        reads += 1
    if reads == len(paths):
        open(ready, "w").close()
print(json.dumps({"reads": reads, "errors": errors}))
"""


def _acked(ack: Path) -> list[int]:
    text = ack.read_text() if ack.exists() else ""
    return [int(line) for line in text.split("\n")[:-1]]  # the last one may be half written


def test_readers_and_writers_through_etc_during_switches(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    shared = ["etc/shared.conf"]
    trees = {n: files_of(n, 20, shared=shared) for n in ("w1", "w2")}
    for name, tree in trees.items():
        loop_devices.attach(build_image(tmp_path, name, tree))
    loop_devices.attach(build_writable_image(tmp_path, size_mb=64), read_only=False)
    daemon.start()
    assert daemon.request({"action": "switch", "personalities": ["w1", "w2"]})["status"] == "ok"
    root = daemon.root
    (root / "etc" / "stress").mkdir()
    stop = tmp_path / "stop"
    ack = tmp_path / "acks"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(stop), str(ack)], stdout=subprocess.PIPE
    )
    ready = [tmp_path / f"reader-{i}-ready" for i in range(2)]
    readers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                READER,
                f"{root}/etc/base.conf:{root}/etc/w1.conf:{root}/usr/share/w2/f000",
                str(stop),
                str(marker),
            ],
            stdout=subprocess.PIPE,
        )
        for marker in ready
    ]
    try:
        # The readers and the writer are at work before the first switch and after the last:
        # every switch happens while they read and write, however slow the machine is.
        wait_for(lambda: bool(_acked(ack)) and all(m.exists() for m in ready), 120, "I/O")
        for i in range(SWITCHES):
            stack = ["w2", "w1"] if i % 2 == 0 else ["w1", "w2"]
            result = daemon.request({"action": "switch", "personalities": stack}, timeout=120)
            assert result["status"] == "ok", result
        after = len(_acked(ack))
        wait_for(lambda: len(_acked(ack)) > after, 120, "a write after the last switch")
    finally:
        stop.touch()
        written = json.loads(writer.communicate(timeout=60)[0])
        read = [json.loads(r.communicate(timeout=60)[0]) for r in readers]
    acked = [int(line) for line in ack.read_text().split()]
    print(f"writer: {written}; acknowledged {len(acked)}; readers: {read}")
    upper = daemon.runtime_dir / "writable" / "upper" / "_etc" / "stress"
    lost = []
    for n in acked:
        expected = f"write {n}\n".encode() * 4
        through_stack = root / "etc" / "stress" / f"w-{n:06d}"
        if (
            through_stack.read_bytes() != expected
            or (upper / through_stack.name).read_bytes() != expected
        ):
            lost.append(n)
    assert not lost, f"{len(lost)} acknowledged writes lost or changed: {lost[:10]}"
    for r in read:
        assert not r["errors"], f"a reader saw errors: {r}"
    final = ["w2", "w1"] if SWITCHES % 2 == 1 else ["w1", "w2"]
    expect_stack(daemon, final, trees, writable=True)
    expect_clean_work_dirs(daemon)
    # Also after a restart, the writes are there (they live on the writable volume).
    daemon.restart()
    for n in acked[-50:]:
        assert (root / "etc" / "stress" / f"w-{n:06d}").read_bytes() == f"write {n}\n".encode() * 4
