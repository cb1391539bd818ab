"""The base's apt-get in the sandbox: update, simulate, install, each failure as one line."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from personalityd.builder import sandbox
from personalityd.client.build import BuildError
from personalityd.core import aptout

LISTS_MAX_AGE: Final = 3600.0  # seconds: older cached lists are updated before a build
UPDATED_STAMP: Final = ".personalityd-updated"
APT_OPTIONS: Final = (
    "-q",
    "-o", "APT::Sandbox::User=root",
    "-o", "APT::Install-Recommends=false",
    "-o", "Acquire::Retries=3",
    "-o", "Dpkg::Use-Pty=0",
)  # fmt: skip
INSTALL_OPTIONS: Final = (
    "-y",
    "-o", "Dpkg::Options::=--force-confdef",
    "-o", "Dpkg::Options::=--force-confold",
    # A scratch overlay, thrown away if the build fails: no fsync of every file.
    "-o", "Dpkg::Options::=--force-unsafe-io",
)  # fmt: skip

Runner = Callable[[Sequence[str]], "tuple[int, str]"]


def chroot_runner(layout: sandbox.Layout) -> Runner:
    def run(argv: Sequence[str]) -> tuple[int, str]:
        proc = sandbox.run(layout, argv)
        if proc.returncode != 0:
            for line in proc.stdout.splitlines():
                if line.startswith(sandbox.FAILURE_PREFIX):
                    detail = line[len(sandbox.FAILURE_PREFIX) :]
                    raise BuildError(f"cannot set up the build's chroot: {detail}")
        return proc.returncode, proc.stdout

    return run


def update_if_stale(run: Runner, lists: Path) -> bool:
    """`apt-get update` unless the cached lists were updated within the hour; True if it ran."""
    stamp = lists / UPDATED_STAMP
    try:
        if time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return False
    except FileNotFoundError:
        pass
    code, out = run(["apt-get", *APT_OPTIONS, "update"])
    errors = [ln for ln in out.splitlines() if ln.startswith(("E:", "W: Failed", "Err:"))]
    if code != 0 or any(ln.startswith("E:") for ln in errors):
        raise BuildError(f"apt-get update failed: {aptout.last_error(out)}")
    stamp.write_text("")
    return True


def _resolution_error(out: str, packages: Sequence[str]) -> BuildError:
    unknown = aptout.unknown_packages(out)
    if unknown:
        return BuildError(f"unknown package: {', '.join(unknown)} (not in the base's apt sources)")
    unmet = aptout.unmet_dependencies(out)
    if unmet:
        more = f" (and {len(unmet) - 1} more)" if len(unmet) > 1 else ""
        return BuildError(f"dependency conflict with the base: {unmet[0]}{more}")
    return BuildError(f"apt-get cannot install {' '.join(packages)}: {aptout.last_error(out)}")


def simulate(run: Runner, packages: Sequence[str]) -> list[aptout.Action]:
    """What `apt-get install` would do, or BuildError saying why it cannot."""
    code, out = run(["apt-get", *APT_OPTIONS, "install", "-s", *packages])
    if code != 0:
        raise _resolution_error(out, packages)
    return aptout.parse_simulation(out)


def check_base_changes(
    run: Runner, packages: Sequence[str], actions: Sequence[aptout.Action], allow_upgrades: bool
) -> list[aptout.Action]:
    """Refuse removals of base packages always, and upgrades unless allowed; return the latter."""
    changes = aptout.base_changes(actions)
    removals = [a for a in changes if a.is_removal]
    if removals:
        culprit = _culprit(run, packages, removals[0])
        raise BuildError(
            f"dependency conflict with the base: {culprit} would remove the base's package "
            f"{removals[0].package} ({removals[0].installed})"
        )
    upgrades = [a for a in changes if not a.is_removal]
    if upgrades and not allow_upgrades:
        first = upgrades[0]
        culprit = _culprit(run, packages, first)
        more = f" (and {len(upgrades) - 1} more base packages)" if len(upgrades) > 1 else ""
        raise BuildError(
            f"{culprit} needs a newer {first.package} than the base has "
            f"({first.installed} -> {first.version}){more}; "
            "--allow-base-upgrades puts it in the personality over the base's"
        )
    return upgrades


def _culprit(run: Runner, packages: Sequence[str], change: aptout.Action) -> str:
    """Which requested package brings `change` (each simulated alone), else all of them."""
    if len(packages) == 1:
        return packages[0]
    for package in packages:
        code, out = run(["apt-get", *APT_OPTIONS, "install", "-s", package])
        if code == 0 and any(a == change for a in aptout.parse_simulation(out)):
            return package
    return " ".join(packages)


def install(run: Runner, packages: Sequence[str]) -> str:
    """Install `packages` for real (maintainer scripts run); the output, or BuildError."""
    code, out = run(["apt-get", *APT_OPTIONS, *INSTALL_OPTIONS, "install", *packages])
    if code == 0:
        return out
    failures = aptout.dpkg_failures(out)
    if failures:
        raise BuildError(failures[0].message())
    raise _resolution_error(out, packages)
