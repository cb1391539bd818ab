# Debian package and system tests (issue 4). Included by the Makefile (`-include mk/*.mk`).
#
#   make deb            build/deb/personalityd_<version>_all.deb, checked with lintian
#   make dist           dist/: the wheel and sdist (python -m build)
#   make system-test    the package installed in a Debian 12 rootfs booted with systemd-nspawn
#   make system-deps    the Debian packages the two need (only the missing ones)
#
# The rootfs is debootstrap'ed once and cached in .cache/system/ (git-ignored, about 70 MB);
# `make system-clean` removes it. The bundled Python libraries are cached in .cache/wheelhouse.

SYSTEM_APT_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-build \
	python3-installer python3-pip python3-setuptools python3-wheel lintian \
	systemd-container debootstrap squashfs-tools zstd util-linux
DEB_DIR := build/deb
BUILD_STAMP := $(VENV)/.personalityd-build

.PHONY: system-deps deb dist system-test system-clean

## system-deps: debhelper, lintian, systemd-nspawn, debootstrap (only the missing ones)
system-deps:
	tools/apt-install-missing --no-install-recommends $(SYSTEM_APT_PACKAGES)

## deb: the Debian package in build/deb/ (dpkg-buildpackage, then lintian: no errors)
deb: system-deps
	packaging/build-deb $(DEB_DIR)

$(BUILD_STAMP): $(STAMP)
	$(PY) -m pip install --quiet build
	touch $@

## dist: wheel and sdist in dist/ (python -m build)
dist: $(BUILD_STAMP)
	$(PY) -m build --outdir dist .

## system-test: boot the package under systemd in a container and test it (needs root)
system-test: deb deps
	PERSONALITYD_SYSTEM_TEST=1 PERSONALITYD_DEB="$$(ls -t $(DEB_DIR)/personalityd_*_all.deb | head -n1)" \
		$(PY) -m pytest -q -p no:cacheprovider tests/system

## system-clean: the cached rootfs and wheels
system-clean:
	rm -rf .cache/system .cache/wheelhouse
