"""`--tree DIR` over the assembled image tree, and the last sweep for set-id bits."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from personalityd.client.build import BuildError
from personalityd.core.upperplan import ACCOUNT_FILES, CARRIED_TOPS, PROTECTED, is_enable_link

CAPABILITY_XATTR = "security.capability"


def _check_extra(extra: Path) -> list[str]:
    """Refuse what a site tree may not bring: protected paths, the account files, device
    nodes, and anything outside usr/, etc/ and opt/. Returns its unit enablement links."""
    links = []
    for dirpath, dirnames, filenames in os.walk(extra):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, extra)
            if rel.split("/", 1)[0] not in CARRIED_TOPS:
                raise BuildError(f"--tree {extra}: {rel} is outside usr/, etc/ and opt/")
            if rel in ACCOUNT_FILES or any(rel == p or rel.startswith(p + "/") for p in PROTECTED):
                raise BuildError(f"--tree {extra}: {rel} is a protected path")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode) and is_enable_link(rel):
                links.append(rel)
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise BuildError(f"--tree {extra}: {rel} is not a file, directory or symlink")
    return links


def copy_tree_over(extra: Path, tree: Path) -> list[str]:
    """Copy `extra` over `tree` (files replace files; owners as in `extra`). A unit
    enablement link in it (etc/systemd/system/X.wants/UNIT) is not copied: its unit is
    returned, for PERSONALITY_SERVICES, as for the packages' own."""
    links = _check_extra(extra)
    # A kept file is a hard link into the scratch upper: replace it, never write into it.
    for dirpath, _dirnames, filenames in os.walk(extra):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), extra)
            target = tree / rel
            if target.is_symlink() or target.is_file():
                target.unlink()
    proc = subprocess.run(
        ["cp", "-a", "--remove-destination", "--", f"{extra}/.", f"{tree}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise BuildError(f"--tree {extra}: {detail}")
    for rel in links:
        (tree / rel).unlink()
        wants = (tree / rel).parent
        if not any(wants.iterdir()):
            wants.rmdir()
    return [rel.rsplit("/", 1)[1] for rel in links]


def strip_privileges(tree: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Remove set-user-ID and set-group-ID bits and `security.capability` attributes of the
    files below `tree`: ([(path, old mode)], [paths that had capabilities])."""
    setid: list[tuple[str, int]] = []
    caps: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(tree):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(full, tree)
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(full, stat.S_IMODE(st.st_mode) & 0o1777)
                setid.append((rel, stat.S_IMODE(st.st_mode)))
            if CAPABILITY_XATTR in os.listxattr(full, follow_symlinks=False):
                os.removexattr(full, CAPABILITY_XATTR, follow_symlinks=False)
                caps.append(rel)
    return setid, caps
