"""Running a program in a private mount namespace (`unshare -m --propagation private`).

Every mount made in there dies with the namespace, even when cleanup fails; loop devices,
udev and the journal stay global, and their users clean those up by name and PID.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def reexec_unshared(argv: Sequence[str], marker_env: str) -> None:
    """Replace this process by `argv` under `unshare -m --propagation private`.

    `marker_env=1` is set for the new process, so that it knows not to do this again.
    Does not return.
    """
    os.environ[marker_env] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp("unshare", ["unshare", "-m", "--propagation", "private", "--", *argv])


def in_private_mount_namespace(marker_env: str) -> bool:
    """True when `marker_env=1` and our mount namespace is not PID 1's."""
    if os.environ.get(marker_env) != "1":
        return False
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return True  # PID 1's namespace is not visible to us: trust the marker
