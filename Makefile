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
# xfsprogs, btrfs-progs: xfs and btrfs volumes whose log needs replay (tests/integration/
# test_never_written.py).
# fdisk: sfdisk for GPT disk images; gpgv, gnupg: SHA256SUMS.gpg checks and the test keys.
APT_PACKAGES := udev squashfs-tools erofs-utils dbus e2fsprogs dosfstools util-linux attr \
	xfsprogs btrfs-progs fdisk gpgv gnupg \
	libsystemd-dev pkg-config gcc python3-dev python3-venv systemd libglib2.0-bin

.PHONY: help deps apt-deps demo test lint typecheck unit clean

## help: this list: every target with a `## target: text` line in Makefile and mk/*.mk
help:
	@echo 'Targets (make TARGET; the default is test):'
	@awk '/^## [A-Za-z0-9_.-]+: / { line = substr($$0, 4); i = index(line, ": "); \
		printf "  %-14s %s\n", substr(line, 1, i - 1), substr(line, i + 2) }' $(MAKEFILE_LIST)

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

## lint: ruff check, with the rules in pyproject.toml
lint: deps
	$(VENV)/bin/ruff check daemon tests bench demo testkit

## typecheck: mypy --strict (the files in pyproject.toml, then each extra conftest.py)
typecheck: deps
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests/stress/conftest.py
	$(VENV)/bin/mypy tests/system/conftest.py

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
