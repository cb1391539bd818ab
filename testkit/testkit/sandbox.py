"""The sandbox root: a minimal base OS tree with known content for the daemon to stack onto."""

from __future__ import annotations

from pathlib import Path

from testkit.images import write_tree

BASE_TOOL_BYTES = b"#!/bin/sh\necho base-tool from the base\n"
BASE_CONF = "# base.conf from the base\nsetting = base\n"
BASE_MOTD = "Welcome to the base system.\n"
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def make_sandbox_root(root: Path) -> Path:
    """A minimal base OS tree at `root` (Debian 12 os-release, usr/bin/base-tool, etc/...)."""
    write_tree(
        root,
        {
            "usr/bin/base-tool": BASE_TOOL_BYTES,
            "usr/sbin": ("dir",),
            "usr/lib/os-release": OS_RELEASE,
            "usr/share/doc": ("dir",),
            "etc/os-release": OS_RELEASE,
            "etc/base.conf": BASE_CONF,
            "etc/motd": BASE_MOTD,
            "opt": ("dir",),
            "var": ("dir",),
            "run": ("dir",),
        },
    )
    return root
