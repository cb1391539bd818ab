"""stack: 3 fresh personalities stacked by a just-started daemon, against `systemd-sysext merge`."""

from __future__ import annotations

import statistics
import time

from client import timed_switch
from dataset import STACK_A, stack_recipes
from harness import Env
from profiling import profiled
from progress import log
from record import Benchmark, Row, measured
from settings import RUN_DIR, RUNS, STACK_FILES
from sysext import Sysext


def measure(env: Env) -> list[Row]:
    recipes = stack_recipes()[:3]
    env.attach(stack_recipes())
    sysext = Sysext(RUN_DIR / "sysext-root")
    ours: list[float] = []
    ref: list[float] = []
    try:
        sysext.use(recipes)
        for run in range(RUNS):
            ref.append(sysext.merge())
            assert all(sysext.shows(r) for r in recipes), "sysext merge did not show the files"
            sysext.unmerge()
            daemon = env.start_daemon()
            time.sleep(1.0)  # past start-up (the D-Bus attempt, lazy imports): a running daemon
            with profiled(daemon, f"stack-{run + 1}", 2):
                ours.append(timed_switch(daemon, STACK_A))
            log(f"stack run {run + 1}: personalityd {ours[-1]:.3f} s, sysext {ref[-1]:.3f} s")
    finally:
        sysext.close()
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    return [
        measured(
            "stack",
            f"stack 3 personalities of {STACK_FILES:,} files each (mount, index, conflicts, "
            "overlays, journal)",
            "s",
            ours,
            reference=(
                "systemd-sysext merge --root (no conflict detection; /usr only in systemd 252)",
                ref,
            ),
            goal="at most 0.5x sysext's time",
            met=statistics.median(ratios) <= 0.5,
            notes="personalityd: a switch spool request to a freshly started daemon (1 s after "
            "it is ready; volumes probed, nothing mounted or indexed), to its result file; it "
            "stacks /usr and /etc and journals 52 conflicts; the 3 volumes are indexed side by "
            "side",
            ratios=ratios,
        )
    ]


BENCHMARK = Benchmark("stack", stack_recipes, measure)
