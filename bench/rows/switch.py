"""switch and switch_reorder: switches between known stacks, against `systemd-sysext refresh`."""

from __future__ import annotations

import statistics

from client import timed_switch
from dataset import STACK_A, STACK_B, stack_recipes
from harness import Env
from progress import log
from record import Benchmark, Row, measured
from settings import RUN_DIR, RUNS
from sysext import Sysext


def measure(env: Env) -> list[Row]:
    recipes = stack_recipes()
    env.attach(recipes)
    daemon = env.start_daemon()
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    sysext = Sysext(RUN_DIR / "sysext-root")
    ours: list[float] = []
    ref: list[float] = []
    reorder: list[float] = []
    try:
        sysext.use(recipes[:3])
        sysext.merge()
        for run in range(RUNS):
            target = STACK_A if run % 2 == 0 else STACK_B
            sysext.use(recipes[:3] if run % 2 == 0 else recipes[3:])
            ref.append(sysext.refresh())
            ours.append(timed_switch(daemon, target))
            log(f"switch run {run + 1}: personalityd {ours[-1]:.3f} s, sysext {ref[-1]:.3f} s")
        for run in range(RUNS):
            names = STACK_B if run % 2 == 0 else list(reversed(STACK_B))
            reorder.append(timed_switch(daemon, names))
    finally:
        sysext.close()
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    reorder_ratios = [a / b for a, b in zip(reorder, ref, strict=True)]
    return [
        measured(
            "switch",
            "switch between two disjoint 3-personality stacks (volumes known and indexed)",
            "s",
            ours,
            reference=("systemd-sysext refresh (the other 3 images put in place beforehand)", ref),
            goal="at most 0.3x",
            met=statistics.median(ratios) <= 0.3,
            notes="personalityd unmounts the 3 old volumes and mounts the 3 new ones in each "
            "switch",
            ratios=ratios,
        ),
        measured(
            "switch_reorder",
            "switch to a reordered stack of the same 3 personalities (all volumes mounted)",
            "s",
            reorder,
            reference=("systemd-sysext refresh (same runs as above)", ref),
            goal="at most 0.3x",
            met=statistics.median(reorder_ratios) <= 0.3,
            ratios=reorder_ratios,
        ),
    ]


BENCHMARK = Benchmark("switch", stack_recipes, measure)
