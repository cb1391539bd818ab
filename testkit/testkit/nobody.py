"""Running a command as the unprivileged user 65534 (nobody) without groups, as an attacker.

Tests keep their trees under pytest's own 0700 temporary directories, which uid 65534 cannot
pass. The command therefore starts in a directory of the tree (`cwd`) and is given paths
relative to it: the kernel checks the permissions of everything below `cwd`, exactly as it
would below `/` on a real system, and nothing above it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def run_as_nobody(
    cwd: Path, *argv: str | os.PathLike[str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as uid and gid 65534 with no supplementary groups, in `cwd`; never raises
    for the command's exit status (an attack is expected to fail)."""
    return subprocess.run(
        [*AS_NOBODY, *(os.fspath(a) for a in argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
