# The Debian stacks (issue 11). Included by the Makefile (`-include mk/*.mk`).
#
#   make demo-debian    web, datascience and gameserver from Debian packages, under systemd
#
# Caches (git-ignored): .cache/apt (downloaded packages), .cache/stacks (built images and
# their file lists), .cache/system (the rootfs, shared with make system-test).

.PHONY: demo-debian

## demo-debian: the three stacks from Debian packages under systemd in nspawn (root; < 3 min warm)
demo-debian: deps system-deps deb
	PERSONALITYD_DEMO_MADE=1 demo/debian.sh
