"""The real systemd-sysext (systemd 252, Debian 12) on a sandbox root, as a host runs it today.

What it takes to run `systemd-sysext --root=ROOT merge` without systemd as PID 1, inside the
test session's private mount namespace (found by running it; systemd 252's src/sysext/sysext.c):

- Its merge child makes `/run` MS_SLAVE|MS_REC first and stops with "Failed to remount /run/
  MS_SLAVE: Invalid argument" when `/run` is not a mount point of its own (it is a plain
  directory on this machine). `sysext()` therefore runs it in a mount namespace of its own
  (`unshare -m --propagation unchanged`) where `/run` is bound onto itself (`mount --rbind`), so
  the session's mount table is not touched. Its workspace is the host's
  `/run/systemd/sysext`, a tmpfs only in that child's namespace.
- The merged overlay is made in that child's namespace and bound onto `ROOT/usr`: it reaches
  the namespace that runs the daemon only through mount propagation, which the test session
  turns off (everything private). `shared_root()` makes `ROOT` a shared mount (bound onto
  itself), as `/` is shared on a host booted with systemd.
- In 252 the exit status of `merge` and `refresh` is 0 even when the merge child failed (the
  child's exit status is taken as "did something"), so `SysextResult.merged` judges by what it
  says it merged; and `status` with `--root` reads `.systemd-sysext/extensions` without the
  root prefix, so `merged_extensions()` reads that file itself.
- Its loop devices show a back-file relative to the root (`/var/lib/extensions/x.raw`): the
  file was opened through a mount of a namespace that is gone. `loops_on_files()` matches
  `losetup --json` rows by the backing file's device and inode (`file_identity()`) instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testkit.images import FileSpec, build_image
from testkit.mounts import unmount_tree
from testkit.processes import run

# systemd-sysext's search directories, in its order of precedence (systemd 252).
SYSEXT_DIRS = (
    "/etc/extensions",
    "/run/extensions",
    "/var/lib/extensions",
    "/usr/local/lib/extensions",
    "/usr/lib/extensions",
)
# What systemd-sysext puts at the top of each merged hierarchy (its metadata layer).
META_DIR = ".systemd-sysext"
# A manifest that systemd 252 accepts on the sandbox base (Debian 12): with ID set and no
# SYSEXT_LEVEL in the base, it insists on a VERSION_ID equal to the base's.
DEBIAN_12 = {"ID": "debian", "VERSION_ID": "12"}


def build_sysext(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    manifest: Mapping[str, str] | None = None,
) -> Path:
    """A sysext image `name` (squashfs, root-owned files) with
    `usr/lib/extension-release.d/extension-release.<name>`, by default for Debian 12."""
    return build_image(tmp_path, name, files, "squashfs", manifest or DEBIAN_12)


def extension_dir(root: Path, rel: str = "/var/lib/extensions") -> Path:
    """`root/rel`, every directory from `root` down made root-owned 0755 (sysext and
    personalityd both insist on that; personalityd checks it)."""
    directory = root / rel.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    current = directory
    while current != root:
        os.chmod(current, 0o755)
        current = current.parent
    return directory


def install_sysext(image: Path, directory: Path, filename: str) -> Path:
    """Copy `image` to `directory/filename`, root 0644, written beside it and renamed in."""
    target = directory / filename
    part = directory / f".{filename}.part"
    shutil.copyfile(image, part)
    os.chmod(part, 0o644)
    os.replace(part, target)
    return target


@dataclass(frozen=True)
class SysextResult:
    """What one `systemd-sysext` run did: its exit status and everything it printed."""

    args: tuple[str, ...]
    returncode: int
    output: str

    @property
    def merged(self) -> bool:
        """It says it merged (in 252 the exit status is no guide, see the module docstring)."""
        return "Merged extensions into" in self.output


def sysext(root: Path, *args: str, timeout: float = 120) -> SysextResult:
    """`systemd-sysext --root=ROOT ARGS...` in a mount namespace of its own where `/run` is a
    mount point; stdout and stderr together."""
    script = 'mount --rbind /run /run && exec systemd-sysext "$@"'
    cmd = ["unshare", "-m", "--propagation", "unchanged", "--", "sh", "-c", script, "sh"]
    proc = subprocess.run(
        [*cmd, f"--root={root}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    return SysextResult(tuple(args), proc.returncode, proc.stdout)


def sysext_ok(root: Path, *args: str) -> SysextResult:
    """`sysext()` that must exit 0 (with the output in the message when it does not)."""
    result = sysext(root, *args)
    assert result.returncode == 0, f"systemd-sysext {' '.join(args)}: {result.output}"
    return result


def listed_extensions(root: Path) -> dict[str, dict[str, Any]]:
    """`systemd-sysext list --json=short`: name -> its row (type, path, time)."""
    rows: list[dict[str, Any]] = json.loads(sysext_ok(root, "list", "--json=short").output)
    return {row["name"]: row for row in rows}


def merged_extensions(root: Path, hierarchy: str = "/usr") -> list[str] | None:
    """The extensions systemd-sysext merged on `hierarchy` (its metadata file), None when its
    merge is not the mount on top there (what `status` would say, if it worked with --root)."""
    path = root / hierarchy.lstrip("/")
    meta = path / META_DIR
    try:
        recorded = (meta / "dev").read_text().strip()
        names = (meta / "extensions").read_text().split()
    except FileNotFoundError:
        return None
    st = os.lstat(path)
    if recorded != f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}":
        return None  # another filesystem on top, which shows the metadata from below
    return names


@contextlib.contextmanager
def shared_root(root: Path) -> Iterator[Path]:
    """`root` bound onto itself as a shared mount while the block runs (see the module
    docstring); then everything mounted at or below it is lazily unmounted, newest first.

    Stop every daemon on `root` before the block ends: its mounts go with the tree."""
    run("mount", "--bind", root, root)
    try:
        run("mount", "--make-shared", root)
        yield root
    finally:
        unmount_tree(root)


def file_identity(path: Path) -> tuple[str, int]:
    """(`major:minor`, inode) of `path` as losetup reports a backing file. Take it while
    nothing is mounted over the file's directory (a file under /usr read through a merge or a
    stack shows the overlay's device and inode instead)."""
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino


def loops_on_files(identities: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """`losetup --json` rows whose backing file has one of these `file_identity()`s (device
    and inode hold whichever namespace the loop device was made in, where the back-file name
    does not)."""
    wanted = set(identities)
    out = run(
        "losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO"
    ).strip()
    rows: list[dict[str, Any]] = json.loads(out)["loopdevices"] if out else []
    # losetup 2.38 pads the major:minor column even in JSON.
    return [r for r in rows if (str(r["back-maj:min"]).strip(), int(r["back-ino"])) in wanted]
