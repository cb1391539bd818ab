# personalityd: build, test and demo. `make demo` and `make test` run as root on Debian 12.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
# Reinstalled into the venv whenever pyproject.toml is newer than this stamp.
STAMP := $(VENV)/.personalityd-installed

# systemd-python builds from source: libsystemd-dev, pkg-config, gcc, python3-dev.
# systemd provides journald, journalctl and busctl for the tests; nothing needs it as PID 1.
# libglib2.0-bin: gdbus, which the D-Bus tests use as an independent client.
APT_PACKAGES := udev squashfs-tools erofs-utils dbus e2fsprogs dosfstools util-linux attr \
	libsystemd-dev pkg-config gcc python3-dev python3-venv systemd libglib2.0-bin

.PHONY: deps apt-deps demo test lint typecheck unit clean

## deps: Debian packages (only the missing ones) and the virtualenv with the project in it
deps: apt-deps $(STAMP)

apt-deps:
	tools/apt-install-missing $(APT_PACKAGES)

$(STAMP): pyproject.toml testkit/pyproject.toml | apt-deps
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]' -e ./testkit
	touch $@

## demo: the self-contained demo (sandbox root, loop devices, three personalities)
demo: deps
	demo/run.sh

## test: lint, typecheck, then every test (unit and integration)
test: lint typecheck
	$(PY) -m pytest -q tests/unit tests/integration

lint: deps
	$(VENV)/bin/ruff check daemon tests bench demo testkit

typecheck: deps
	$(VENV)/bin/mypy

## unit: the unit tests only (no root needed)
unit: deps
	$(PY) -m pytest -q tests/unit

## clean: caches, build output, the demo's work dir, the install stamp (not the venv)
clean:
	if [ -d demo/work ]; then demo/run.sh clean; fi
	rm -rf build dist daemon/*.egg-info testkit/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find daemon tests demo bench testkit -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(STAMP)

-include mk/*.mk
