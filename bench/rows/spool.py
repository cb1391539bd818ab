"""spool: a burst of requests renamed into the spool at once, answered and coalesced."""

from __future__ import annotations

import json
import time
from typing import Any

from client import timed_switch
from dataset import STACK_A, STACK_B, stack_recipes
from harness import Env
from progress import log
from record import Benchmark, Row, measured
from settings import RUNS, SPOOL_REQUESTS
from testkit.daemon import Daemon
from testkit.spool import ResultWatch, wait_result

# An attach/detach/switch mix, repeated over the burst.
PATTERN: list[dict[str, Any]] = [
    {"action": "switch", "personalities": STACK_A},
    {"action": "attach", "personality": "stk4"},
    {"action": "detach", "personality": "stk2"},
    {"action": "attach", "personality": "stk5"},
    {"action": "switch", "personalities": ["stk6", "stk5"]},
    {"action": "detach", "personality": "stk6"},
    {"action": "attach", "personality": "stk1"},
]


def _burst(env: Env, daemon: Daemon, run: int) -> tuple[float, int, int]:
    """(seconds to the last result, rebuilds, ok results) of one burst of SPOOL_REQUESTS."""
    spool = daemon.spool_dir
    names = [f"burst{run}-{i:04d}" for i in range(SPOOL_REQUESTS)]
    for i, name in enumerate(names):
        body = {**PATTERN[i % len(PATTERN)], "id": f"r{i}"}
        (spool / f".tmp-{name}").write_text(json.dumps(body))
    rebuilds_before = env.rebuilds()
    with ResultWatch(spool) as watch:
        started = time.monotonic()
        for name in names:
            (spool / f".tmp-{name}").rename(spool / f"{name}.json")
        results = [wait_result(spool, name, 120, watch=watch, moved=False) for name in names]
        elapsed = time.monotonic() - started
    time.sleep(0.2)
    rebuilds = env.rebuilds() - rebuilds_before
    return elapsed, rebuilds, sum(1 for r in results if r["status"] == "ok")


def measure(env: Env) -> list[Row]:
    env.attach(stack_recipes())
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    ours: list[float] = []
    rebuild_counts: list[float] = []
    oks: list[int] = []
    for run in range(RUNS):
        elapsed, rebuilds, ok = _burst(env, daemon, run)
        ours.append(elapsed)
        rebuild_counts.append(rebuilds)
        oks.append(ok)
        log(f"spool run {run + 1}: {elapsed:.2f} s, {rebuilds} rebuilds, {ok} ok")
    met = max(ours) < 10 and max(rebuild_counts) <= SPOOL_REQUESTS / 20
    return [
        measured(
            "spool",
            f"{SPOOL_REQUESTS:,} spool requests dropped at once (attach/detach/switch mix)",
            "s",
            ours,
            goal="all answered, under 10 s, at most 1 stack rebuild per 20 requests",
            met=met,
            notes=f"rebuilds per burst: {[int(r) for r in rebuild_counts]}; requests answered "
            f"ok: {oks}",
            extra={"rebuilds": list(rebuild_counts), "ok": list(oks)},
        )
    ]


BENCHMARK = Benchmark("spool", stack_recipes, measure)
