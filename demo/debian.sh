#!/usr/bin/env bash
# personalityd's Debian demo (`make demo-debian`): the web, datascience and gameserver stacks
# built from Debian 12's own packages, booted under systemd in a systemd-nspawn container, each
# shown working. Run as root on Debian 12. `make demo-debian` first runs `make deps system-deps
# deb` (the venv, nspawn/debootstrap, the package); run directly, this script does too.
#
# The first run downloads the packages and builds the images (several minutes); later runs use
# the caches under .cache/ (apt downloads, images, the rootfs) and take well under 3 minutes.
# What it leaves behind: nothing but those caches (see demo/debian.py for the cleanup).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
cd "$REPO"

[ "$(id -u)" = 0 ] || { echo "demo-debian: run as root (nspawn, loop devices, chroot builds)" >&2; exit 1; }
if [ "${PERSONALITYD_DEMO_MADE:-}" != 1 ]; then
    make --no-print-directory deps system-deps deb
fi
deb=$(ls -t build/deb/personalityd_*_all.deb 2>/dev/null | head -n1 || true)
[ -n "$deb" ] || { echo "demo-debian: no package in build/deb: run make deb" >&2; exit 1; }

exec env PYTHONPATH="$REPO/daemon:$REPO/tests/system" "$REPO/.venv/bin/python" \
    "$HERE/debian.py" "$deb"
