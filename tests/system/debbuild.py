"""Helpers for building personalities with `personalityctl build --packages` in the system
tests: the command, the shared download cache, looking into squashfs images, tiny .deb files
and a flat apt repository, and a digest of a whole tree (to prove the base unchanged).

    from debbuild import build
    proc = build(base, workdir / "web.squashfs", "--packages", "nginx", "--name", "web")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nspawn import REPO, run

CACHE_DIR = REPO / ".cache" / "apt"  # git-ignored, shared by every build of the tests


def personalityctl(
    *args: str | os.PathLike[str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "daemon"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def build(base: Path, out: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return personalityctl("build", "--base", base, "--cache-dir", CACHE_DIR, "-o", out, *args)


def snapshot(root: Path) -> str:
    """A digest of everything under `root`: names, types, modes, owners, times, contents,
    link targets and extended attributes."""
    digest = hashlib.sha256()
    paths = [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths += [os.path.join(dirpath, n) for n in sorted(dirnames + filenames)]
    for path in paths:
        st = os.lstat(path)
        fields = [path, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                  st.st_ctime_ns, st.st_rdev, st.st_nlink]  # fmt: skip
        if os.path.islink(path):
            fields.append(os.readlink(path))
        else:
            xattrs = sorted(os.listxattr(path, follow_symlinks=False))
            fields += [(x, os.getxattr(path, x, follow_symlinks=False)) for x in xattrs]
        digest.update(repr(fields).encode())
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def listing(image: Path) -> dict[str, str]:
    """path -> `unsquashfs -lls` mode string, for every entry of a squashfs image."""
    out = run("unsquashfs", "-d", "", "-lln", image).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[0][0] in "-dlcbps":
            path = parts[5].split(" -> ")[0].lstrip("/")
            found[path] = parts[0]
    return found


def cat(image: Path, path: str) -> str:
    return run("unsquashfs", "-cat", image, path).stdout


def make_deb(directory: Path, name: str, version: str = "1.0", **fields: str) -> Path:
    """A tiny arch-all .deb; `files`, `postinst` and other control fields from `fields`."""
    root = directory / f"{name}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    files = json.loads(fields.pop("files", "{}"))
    modes = json.loads(fields.pop("modes", "{}"))
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(int(modes.get(rel, "755" if "/bin/" in rel else "644"), 8))
    postinst = fields.pop("postinst", "")
    control = {
        "Package": name,
        "Version": version,
        "Architecture": "all",
        "Maintainer": "personalityd tests <tests@example.invalid>",
        "Description": f"{name}: test package",
        **fields,
    }
    (root / "DEBIAN/control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
    if postinst:
        (root / "DEBIAN/postinst").write_text(postinst)
        (root / "DEBIAN/postinst").chmod(0o755)
    deb = directory / f"{name}_{version}_all.deb"
    run("dpkg-deb", "--root-owner-group", "--build", root, deb)
    shutil.rmtree(root)
    return deb


def flat_repository(repo: Path, debs: list[Path]) -> None:
    """A flat apt repository (`deb [trusted=yes] file:... ./`) with a hand-written Packages."""
    stanzas = []
    for deb in debs:
        control = run("dpkg-deb", "--field", deb).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
        shutil.copy(deb, repo / deb.name)
    (repo / "Packages").write_text("\n".join(stanzas))
