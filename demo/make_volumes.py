#!/usr/bin/env python3
"""Build the demo's sandbox base and volume images under WORK (stdlib only, run as root).

    demo/make_volumes.py WORK

Creates:
    WORK/root/                      the base: usr/bin, etc, os-release ID=debian VERSION_ID=12
    WORK/volumes/datascience.squashfs
    WORK/volumes/web.erofs
    WORK/volumes/gameserver.ext4    ext4 label `personality-game` (ext4 labels: 16 bytes max)
    WORK/data/data.ext4             empty ext4 labelled `personality-data` (the writable volume)
    WORK/trees/<name>/              the source trees of the images

Overlaps, on purpose: `usr/bin/python-tool` differs between datascience and web (a real
conflict), `usr/share/doc/common/README` is identical in web and gameserver (an identical
conflict), and gameserver's `etc/motd` overrides the base's (an override, not a conflict).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
COMMON_README = "Shared documentation, shipped identically by web and gameserver.\n"


def script(text: str) -> str:
    return "#!/bin/sh\n" + text.strip() + "\n"


BASE = {
    "usr/bin/base-tool": script("echo 'base-tool from the base'"),
    "usr/lib/os-release": OS_RELEASE,
    "etc/os-release": OS_RELEASE,
    "etc/motd": "Welcome to the base system.\n",
    "etc/hostname": "demo\n",
    "usr/share/doc/base/README": "The base system.\n",
}

PERSONALITIES: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "datascience": (
        "squashfs",
        {"IMAGE_VERSION": "2024.10", "PERSONALITY_DESCRIPTION": "Jupyter and scientific Python"},
        {
            "usr/bin/jupyter-lab": script("echo 'JupyterLab (demo) starting'"),
            "usr/bin/python-tool": script("echo 'python-tool 1.26 from datascience'"),
            "usr/lib/python3/dist-packages/numpy/__init__.py": '__version__ = "1.26.4"\n',
            "etc/datascience.conf": "notebook_dir = /srv/notebooks\n",
        },
    ),
    "web": (
        "erofs",
        {"IMAGE_VERSION": "1.24.0", "PERSONALITY_DESCRIPTION": "nginx web server"},
        {
            "usr/sbin/nginx": script("echo 'nginx (demo) listening on :80'"),
            "usr/bin/python-tool": script("echo 'python-tool 3.11 from web'"),
            "etc/nginx/nginx.conf": "events {}\nhttp { server { listen 80; } }\n",
            "usr/share/doc/common/README": COMMON_README,
        },
    ),
    "gameserver": (
        "ext4",
        {"IMAGE_VERSION": "7.1", "PERSONALITY_DESCRIPTION": "Dedicated game server"},
        {
            "usr/games/server": script("echo 'game server (demo) ready'"),
            "etc/gameserver.conf": "max_players = 16\n",
            "usr/share/doc/common/README": COMMON_README,
            "etc/motd": "Welcome to the GAME SERVER.\n",
        },
    ),
}

# The name comes from the manifest; the label only helps an admin (and udev) recognize it.
EXT4_LABELS = {"gameserver": "personality-game"}


def run(*cmd: str | Path) -> None:
    subprocess.run([os.fspath(c) for c in cmd], check=True)


def write_tree(top: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o755 if content.startswith("#!") else 0o644)


def manifest(fields: dict[str, str]) -> str:
    lines = ["ID=debian", 'VERSION_ID="12"']
    lines += [f'{key}="{value}"' for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def tree_size(top: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        total += 4096 * (len(dirnames) + len(filenames))
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
    return total


def build(name: str, fmt: str, src: Path, image: Path) -> None:
    if fmt == "squashfs":
        run("mksquashfs", src, image, "-noappend", "-quiet", "-no-progress", "-all-root")
    elif fmt == "erofs":
        run("mkfs.erofs", "--quiet", "--all-root", image, src)
    elif fmt == "ext4":
        with open(image, "wb") as f:
            f.truncate(max(4 << 20, 2 * tree_size(src) + (2 << 20)))
        run("mkfs.ext4", "-q", "-d", src, "-L", EXT4_LABELS[name], image)
    else:
        raise ValueError(fmt)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    work = Path(sys.argv[1]).resolve()
    for sub in ("root", "volumes", "data", "trees"):
        (work / sub).mkdir(parents=True, exist_ok=True)

    write_tree(work / "root", BASE)
    for sub in ("usr/sbin", "usr/games", "opt", "var", "run"):
        (work / "root" / sub).mkdir(parents=True, exist_ok=True)

    for name, (fmt, fields, files) in PERSONALITIES.items():
        src = work / "trees" / name
        write_tree(src, files)
        release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text(manifest(fields))
        image = work / "volumes" / f"{name}.{fmt}"
        build(name, fmt, src, image)
        print(f"  built {image.relative_to(work)} ({fmt}, {image.stat().st_size} bytes)")

    data = work / "data" / "data.ext4"
    with open(data, "wb") as f:
        f.truncate(64 << 20)
    run("mkfs.ext4", "-q", "-L", "personality-data", data)
    print(f"  built {data.relative_to(work)} (ext4, label personality-data, writable)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
