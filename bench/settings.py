"""How much one benchmark run measures (full or `BENCH_QUICK=1`), and where its files go."""

from __future__ import annotations

import os
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data"  # git-ignored: images, trees, the run's sandbox, profiles
RUN_DIR = DATA / "run"
HELPERS = BENCH / "helpers.py"  # the small processes run beside the daemon
RESULTS_JSON = BENCH / "results.json"
RESULTS_MD = BENCH / "results.md"
ANALYSIS_MD = BENCH / "analysis.md"  # appended to results.md as it is

QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = 3 if QUICK else 5
STACK_FILES = 2_000 if QUICK else 10_000
BIG_FILES = 20_000 if QUICK else 100_000
HOT_FILES = 1_000
READER_SWITCHES = 30 if QUICK else 100
READER_RUNS = 2 if QUICK else RUNS
SPOOL_REQUESTS = 1_000
DBUS_SECONDS = 5.0 if QUICK else 10.0
DBUS_RUNS = 2 if QUICK else RUNS
DBUS_CLIENTS = 10
LAYERS = 500
SCALE_FILES = 1_000  # image files in one search path (files_scale)
SCALE_SPARE = 20  # more, moved in and out of it while ListPersonalities is measured
SCALE_SECONDS = 5.0 if QUICK else 10.0
