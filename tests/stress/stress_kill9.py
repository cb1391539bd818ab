"""kill -9 of the daemon at random moments during switches and spool bursts, restart each time.

Afterwards: every request answered exactly once, the desired list as last acknowledged, the
stacked files byte-exact against the volumes, no leftover mounts or overlay work dirs.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from testkit.daemon import Daemon
from testkit.images import build_image, build_writable_image
from testkit.loops import LoopDevices
from testkit.spool import drop, spool_answers, wait_answered
from testkit.stack import desired_of, expect_clean_work_dirs, expect_stack, files_of

KILLS = int(os.environ.get("STRESS_KILLS", "30"))
NAMES = ["k1", "k2", "k3", "k4"]
SHARED = ["usr/bin/shared-tool", "etc/shared.conf"]


def test_kill9_during_switches_and_spool_bursts(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    seed = int(os.environ.get("STRESS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"seed {seed}")
    trees = {n: files_of(n, 40, shared=SHARED) for n in NAMES}
    for name in NAMES:
        loop_devices.attach(build_image(tmp_path, name, trees[name], "squashfs"))
    loop_devices.attach(build_writable_image(tmp_path), read_only=False)
    daemon.start()
    spool = daemon.spool_dir
    stems: list[str] = []
    for cycle in range(KILLS):
        for i in range(rng.randint(1, 12)):
            stem = f"c{cycle:02d}-{i:02d}"
            action = rng.choice(["switch", "switch", "attach", "detach"])
            if action == "switch":
                names = rng.sample(NAMES, rng.randint(0, len(NAMES)))
                drop(spool, stem, {"action": "switch", "personalities": names, "id": stem})
            else:
                body = {"action": action, "personality": rng.choice(NAMES), "id": stem}
                drop(spool, stem, body)
            stems.append(stem)
        time.sleep(rng.uniform(0.0, 0.5))
        daemon.kill9()
        daemon.start(timeout=60)

    wait_answered(spool, stems, timeout=180)
    answers = spool_answers(spool, stems)
    for stem, result in answers.items():
        assert result["id"] == stem, result
    last = max(answers.values(), key=lambda r: (r["generation"], r["finished"]))
    desired = desired_of(daemon)
    assert desired == last["attached"], (desired, last)
    expect_stack(daemon, desired, trees, writable=True)
    expect_clean_work_dirs(daemon)
    # A clean stop leaves the stack mounted; a restart adopts it without a rebuild.
    generation_before = last["generation"]
    daemon.restart()
    result = daemon.request({"action": "switch", "personalities": desired})
    assert result["status"] == "ok" and result["changed"] is False, result
    assert result["generation"] >= generation_before
    expect_stack(daemon, desired, trees, writable=True)
