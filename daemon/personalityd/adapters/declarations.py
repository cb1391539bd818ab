"""A personality's declarations (core/declarations.py), read from its own mounted tree, and
applied to the stack with the base's tools (adapters/basetools.py) after a swap.

The tree is the volume's mount (`<mount_root>/<name>`): only what this personality ships
counts, whatever the stack merges in. Entries are looked at with lstat and never followed: a
configuration file must be a regular file (a symlink, such as one to /dev/null that masks a
file of the same name elsewhere, is not a declaration of this personality).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from personalityd.adapters.basetools import BaseTools, ToolUnavailable
from personalityd.core.declarations import (
    LDCONF_DIR,
    SYSUSERS_DIR,
    TMPFILES_DIR,
    TOOL_PATHS,
    Declarations,
    ToolRun,
    is_conf_file,
    is_shared_library,
    library_dirs,
)


@dataclass(frozen=True)
class ToolFailure:
    run: ToolRun
    reason: str  # the tool's own message (or why it could not run), one line or a few


def _listing(tree: str, relative: str) -> list[os.DirEntry[str]]:
    path = os.path.join(tree, relative)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return []
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _conf_files(tree: str, relative: str) -> tuple[str, ...]:
    return tuple(
        sorted(
            e.name
            for e in _listing(tree, relative)
            if is_conf_file(e.name) and e.is_file(follow_symlinks=False)
        )
    )


def read_declarations(name: str, tree: str, multiarch: str) -> Declarations:
    """What the personality `name` mounted at `tree` declares. Raises OSError when the tree
    cannot be read."""
    libraries = bool(_conf_files(tree, LDCONF_DIR)) or any(
        is_shared_library(e.name) and not e.is_dir(follow_symlinks=False)
        for directory in library_dirs(multiarch)
        for e in _listing(tree, directory)
    )
    return Declarations(
        name=name,
        sysusers=_conf_files(tree, SYSUSERS_DIR),
        tmpfiles=_conf_files(tree, TMPFILES_DIR),
        libraries=libraries,
    )


def apply_runs(tools: BaseTools, runs: Sequence[ToolRun]) -> list[ToolFailure]:
    """Run each command in order (blocking: from a worker thread); the failures. A failure
    does not stop the later commands: each declaration stands on its own."""
    failures = []
    for run in runs:
        try:
            outcome = tools.run(TOOL_PATHS[run.tool], run.args)
        except ToolUnavailable as exc:
            failures.append(ToolFailure(run, f"{run.tool}: {exc}"))
            continue
        if outcome.returncode != 0:
            said = outcome.output or "no output"
            failures.append(
                ToolFailure(run, f"{run.tool} exited with status {outcome.returncode}: {said}")
            )
    return failures
