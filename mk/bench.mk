# Benchmarks and the fault/load suite (issue 5). Included by the Makefile (`-include mk/*.mk`).
#
#   make bench          every row of bench/results.md, against its reference, in one run
#   BENCH_QUICK=1 make bench    fewer runs and files (a few minutes)
#   make bench BENCH_ROWS="stack switch"    only some rows
#   make stress         tests/stress/ with counts bounded for CI (under 10 minutes)
#   make profile        py-spy/pyinstrument into the venv (bench/profile.sh uses them)

BENCH_ROWS ?=
PROFILE_STAMP := $(VENV)/.personalityd-profilers

.PHONY: bench stress profilers

$(PROFILE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet py-spy pyinstrument
	touch $@

## profilers: py-spy and pyinstrument in the venv (for profiling the daemon under bench load)
profilers: $(PROFILE_STAMP)

## bench: benchmarks against systemd-sysext, find, a naive swap, udev (writes bench/results.*)
bench: deps $(PROFILE_STAMP)
	$(PY) bench/run.py $(BENCH_ROWS)

## stress: the fault and load suite (kill -9, surprise removal, hostile input, ...)
stress: deps
	$(PY) -m pytest -q -p no:cacheprovider -o python_files='stress_*.py' tests/stress
	# the hostile-volume corpus (also in `make test`): every attack on the trust boundary
	$(PY) -m pytest -q -p no:cacheprovider tests/integration/test_hostile_volumes.py
