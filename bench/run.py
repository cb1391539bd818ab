"""personalityd benchmarks against their references, each measured in the same run.

    python bench/run.py [ROW ...]          (as root; `make bench`; BENCH_QUICK=1 for a short run)
    python bench/run.py --render           results.md again from results.json (and analysis.md)

Rows: stack, switch, hotplug, index, readers, memory, spool, dbus, layers, files_cold,
files_refresh, files_scale (default: all); one
module each in bench/rows/. Writes bench/results.json and bench/results.md (`report.py`); with
only some rows asked for, the others are kept from results.json. See docs/bench.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence

from dataset import Recipe, build_all
from harness import Env
from progress import log
from record import Benchmark, Meta, Row, not_measured
from report import load, merged, write_results
from rows import dbus, files, hotplug, index, layers, memory, readers, spool, stack, switch
from settings import QUICK
from testkit.namespace import reexec_unshared

NAMESPACE_ENV = "PERSONALITYD_BENCH_NS"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        stack.BENCHMARK,
        switch.BENCHMARK,
        hotplug.BENCHMARK,
        index.BENCHMARK,
        readers.BENCHMARK,
        memory.BENCHMARK,
        spool.BENCHMARK,
        dbus.BENCHMARK,
        layers.BENCHMARK,
        files.BENCHMARK_COLD,
        files.BENCHMARK_REFRESH,
        files.BENCHMARK_SCALE,
    )
}


def ensure_private_namespace() -> None:
    """Re-exec this process under `unshare -m --propagation private` once (root only)."""
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (loop devices, mounts, udev)")
    if os.environ.get(NAMESPACE_ENV) != "1":
        reexec_unshared([sys.executable, *sys.argv], NAMESPACE_ENV)


def recipes_for(wanted: Sequence[str]) -> list[Recipe]:
    """The images the wanted benchmarks need, each once."""
    needed: dict[str, Recipe] = {}
    for name in wanted:
        for recipe in BENCHMARKS[name].recipes():
            needed.setdefault(str(recipe.image), recipe)
    return list(needed.values())


def run_all(wanted: Sequence[str]) -> tuple[list[Row], list[str]]:
    """Every wanted benchmark in one environment: (rows, names of the ones that failed)."""
    rows: list[Row] = []
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        env = Env(stack)
        for name in wanted:
            log(f"row {name}")
            try:
                rows += BENCHMARKS[name].measure(env)
            except Exception as exc:  # one broken row must not hide the others
                log(f"row {name} FAILED: {exc!r}")
                failures.append(name)
                rows.append(not_measured(name, exc))
            finally:
                env.stop_daemon()
    return rows, failures


def meta(started: float) -> Meta:
    return Meta(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=platform.machine(),
        kernel=platform.release(),
        cpus=os.cpu_count(),
        quick=QUICK,
        seconds=time.monotonic() - started,
        python=platform.python_version(),
    )


def main() -> int:
    args = sys.argv[1:]
    if args == ["--render"]:
        write_results(*load())
        return 0
    unknown = [a for a in args if a not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(BENCHMARKS)}")
    ensure_private_namespace()
    wanted = args or list(BENCHMARKS)
    started = time.monotonic()
    build_all(recipes_for(wanted))
    rows, failures = run_all(wanted)
    write_results(merged(rows, partial=bool(args)), meta(started))
    log(f"done in {time.monotonic() - started:.0f} s; wrote bench/results.md and results.json")
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
