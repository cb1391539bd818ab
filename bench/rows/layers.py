"""layers: 100, then 499 personalities on one hierarchy; 500 (501 layers) must be refused."""

from __future__ import annotations

import time

from client import timed_switch
from dataset import layer_recipes
from harness import Env
from progress import log
from record import Benchmark, Row, measured


def _visible(env: Env) -> int:
    return len(list((env.root / "usr" / "share").glob("bench-lay*")))


def measure(env: Env) -> list[Row]:
    recipes = layer_recipes()
    log(f"attaching {len(recipes)} loop devices")
    env.attach(recipes)
    names = [r.name for r in recipes]
    daemon = env.start_daemon()
    notes = []
    t100 = timed_switch(daemon, names[:100], timeout=900)
    shown = _visible(env)
    ok100 = shown == 100
    notes.append(f"100 attached in {t100:.2f} s ({shown} visible)")
    t499 = timed_switch(daemon, names[:499], timeout=900)
    shown = _visible(env)
    ok499 = shown == 499
    notes.append(f"499 attached in {t499:.2f} s ({shown} visible)")
    gen_before = daemon.request({"action": "attach", "personality": names[0]}, timeout=300)[
        "generation"
    ]
    started = time.monotonic()
    result = daemon.request({"action": "switch", "personalities": names}, timeout=900)
    t500 = time.monotonic() - started
    shown = _visible(env)
    refused = (
        result["status"] == "error"
        and result["generation"] == gen_before
        and shown == 499
        and len(result["attached"]) == 499
    )
    notes.append(
        f"500 personalities (501 layers) refused in {t500:.2f} s: code={result.get('code')!r} "
        f"message={result.get('message')!r}; generation {result['generation']} "
        f"(before {gen_before}), {shown} still visible"
    )
    env.stop_daemon()
    env.fresh_root()
    env.detach(recipes)
    return [
        measured(
            "layers",
            "layers: attach 100, then 499 personalities to one hierarchy; then 500",
            "s",
            [t100, t499],
            goal="works; the 501st layer is refused with a clear error, nothing else changes",
            met=ok100 and ok499 and refused,
            notes="; ".join(notes),
        )
    ]


BENCHMARK = Benchmark("layers", layer_recipes, measure)
