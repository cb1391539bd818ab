"""memory_idle and memory_per_path: the daemon's resident set, idle and with large indexes."""

from __future__ import annotations

import re
import statistics
import time

from client import timed_switch
from dataset import big_recipes
from harness import Env
from progress import log
from record import Benchmark, Row, measured
from settings import BIG_FILES, RUNS


def measure(env: Env) -> list[Row]:
    recipes = big_recipes()
    env.attach(recipes)
    idle: list[float] = []
    per_path: list[float] = []
    paths = 0
    for run in range(RUNS):
        daemon = env.start_daemon()
        time.sleep(2)
        before = daemon.rss()
        timed_switch(daemon, [r.name for r in recipes], timeout=900)
        time.sleep(2)
        after = daemon.rss()
        match = re.findall(r"event=volume_indexed name=(\S+) entries=(\d+)", daemon.log_text())
        paths = sum(int(n) for _, n in match[-3:])
        idle.append(before / 2**20)
        per_path.append((after - before) / paths)
        log(f"memory run {run + 1}: idle {before / 2**20:.1f} MiB, {per_path[-1]:.1f} B/path")
    env.stop_daemon()
    env.detach(recipes)
    return [
        measured(
            "memory_idle",
            "resident set of the daemon, idle (started, volumes present, nothing attached)",
            "MiB",
            idle,
            goal="under 40 MiB",
            met=statistics.median(idle) < 40,
        ),
        measured(
            "memory_per_path",
            f"resident set per indexed path, 3 x {BIG_FILES:,}-file volumes attached",
            "bytes/path",
            per_path,
            goal="under 40 bytes per path on top of idle",
            met=statistics.median(per_path) < 40,
            notes=f"{paths:,} paths indexed (every entry under /usr of the 3 volumes)",
        ),
    ]


BENCHMARK = Benchmark("memory", big_recipes, measure)
