"""The reference for stacking: `systemd-sysext --root=DIR` on a sandbox root of its own.

Without systemd as PID 1 it works once /run is a mount point (it remounts /run MS_SLAVE in its
child) and the root is a shared mount (the child's overlay must propagate back to us): both
arranged here, inside the benchmark's private mount namespace only.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from dataset import Recipe
from testkit.mounts import is_mount_point, unmount_tree
from testkit.sandbox import make_sandbox_root


class Sysext:
    """`systemd-sysext --root=DIR` with the given images in DIR/var/lib/extensions."""

    def __init__(self, root: Path) -> None:
        self.root = root
        make_sandbox_root(self.root)
        self.extensions = self.root / "var" / "lib" / "extensions"
        self.extensions.mkdir(parents=True, exist_ok=True)
        if not is_mount_point("/run"):
            subprocess.run(["mount", "--bind", "/run", "/run"], check=True)
        subprocess.run(["mount", "--bind", str(self.root), str(self.root)], check=True)
        subprocess.run(["mount", "--make-rshared", str(self.root)], check=True)

    def use(self, recipes: Sequence[Recipe]) -> None:
        """Put copies of these images (and no others) in var/lib/extensions.

        Copies, so that the backing files of sysext's own loop devices are outside
        bench/data/images and the daemon's udev tag never matches them; sysext 252 ignores
        symlinks there. Unused copies wait in var/lib/extensions.off (a rename away)."""
        off = self.extensions.with_name("extensions.off")
        off.mkdir(exist_ok=True)
        for old in self.extensions.iterdir():
            old.rename(off / old.name)
        for recipe in recipes:
            name = f"{recipe.name}.raw"
            if not (off / name).exists():
                shutil.copyfile(recipe.image, off / name)
            (off / name).rename(self.extensions / name)

    def _run(self, verb: str) -> float:
        started = time.monotonic()
        proc = subprocess.run(
            ["systemd-sysext", verb, f"--root={self.root}"], capture_output=True, text=True
        )
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"systemd-sysext {verb} failed: {proc.stderr.strip()}")
        return elapsed

    def merge(self) -> float:
        return self._run("merge")

    def refresh(self) -> float:
        return self._run("refresh")

    def unmerge(self) -> float:
        return self._run("unmerge")

    def shows(self, recipe: Recipe) -> bool:
        return (self.root / "usr" / "share" / f"bench-{recipe.name}").is_dir()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.unmerge()
        unmount_tree(self.root)
