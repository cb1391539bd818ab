"""The three Debian stacks (web, datascience, gameserver): their images, built with
`personalityctl build --packages` against the system test's rootfs, and the container that runs
them with a writable volume.

Used by `tests/system/test_debian_stacks.py` and by `make demo-debian` (`demo/debian.py`).

- Images are built on the host against the unpacked rootfs (with the package installed), which
  the builder only reads. Downloaded packages are cached in `.cache/apt`, built images in
  `.cache/stacks/<name>-<key>.img` with what the builder printed (`.build.json`) and the
  image's file list (`.files.json`). The key covers the rootfs tarball (its own key names the
  suite, mirror and package list), the stack's packages, the builder's source files and the
  site tree's content, so a warm run builds nothing.

The container that runs them is in `stacks_machine.py`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawn import REPO, run

APT_CACHE = REPO / ".cache" / "apt"
IMAGE_CACHE = REPO / ".cache" / "stacks"
TREES = Path(__file__).resolve().parent / "stacks"
HIERARCHIES = ("usr", "etc")
# Bump when the way images or their file lists are made changes outside the builder.
RECIPE = "1"

WEB_PORT = 8080
WEB_URL = f"http://127.0.0.1:{WEB_PORT}/row.php"
WEB_ROW = "row: hello from mariadb through php-fpm\n"
WEB_SERVICES = ("mariadb.service", "php8.2-fpm.service", "nginx.service", "stack-web-seed.service")
GAME_SERVICE = "minetest-server.service"
GAME_PORT = 30000
# The units whose journal a failed test's report shows.
STACKS_UNITS = (
    "personalityd.service",
    "personality@*",
    *WEB_SERVICES,
    GAME_SERVICE,
    "page-check.service",
)


@dataclass(frozen=True)
class Stack:
    name: str
    packages: tuple[str, ...]  # from the Debian archive
    tree: Path | None  # site configuration (--tree)
    description: str
    # Our own packages, as source directories (DEBIAN/ and the files) for dpkg-deb --build.
    local: tuple[Path, ...] = ()


STACKS: dict[str, Stack] = {
    "web": Stack(
        "web",
        ("nginx", "php-fpm", "php-mysql", "mariadb-server"),
        TREES / "web/tree",
        "Web Server Stack (nginx, PHP, MariaDB)",
        local=(TREES / "web/stack-web-seed",),
    ),
    "datascience": Stack(
        "datascience",
        ("python3-numpy", "python3-pandas", "jupyter-notebook", "r-base-core"),
        None,
        "Data Science Stack (Python, R, Jupyter)",
    ),
    "gameserver": Stack("gameserver", ("minetest-server",), None, "Game Server Stack (Minetest)"),
}


# A file list entry: kind ("dir", "file", "symlink", "other") and, for files the SHA-256 of
# the content, for symlinks the target.
Entry = tuple[str, str]


@dataclass(frozen=True)
class BuiltStack:
    stack: Stack
    image: Path
    info: dict[str, object]  # what `build --json` printed
    files: dict[str, Entry]  # "/usr/..." -> entry, for the stacked hierarchies

    @property
    def name(self) -> str:
        return self.stack.name

    def services(self) -> list[str]:
        value = self.info.get("services", [])
        assert isinstance(value, list), self.info
        return [str(v) for v in value]


# --------------------------------------------------------------------------------------------
# cache keys


def _digest_files(paths: Sequence[Path], relative_to: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(relative_to)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def builder_sources_digest() -> str:
    """The builder's code: every personalityd module that the client and builder packages
    import, read from this checkout."""
    probe = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "for top in ('personalityd.client', 'personalityd.builder'):\n"
        "    if importlib.util.find_spec(top) is None:\n"
        "        continue\n"
        "    p = importlib.import_module(top)\n"
        "    for m in pkgutil.walk_packages(p.__path__, top + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and m.__name__.startswith('personalityd'):\n"
        "        print(f)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=builder_env(),
        check=False,
    )
    assert proc.returncode == 0, f"importing the builder failed: {proc.stderr[-2000:]}"
    out = proc.stdout
    daemon = REPO / "daemon"
    files = sorted({Path(line) for line in out.split() if line})
    outside = [f for f in files if daemon not in f.parents]
    assert not outside, f"builder modules imported from outside {daemon}: {outside}"
    return _digest_files(files, daemon)


def tree_digest(tree: Path | None) -> str:
    h = hashlib.sha256()
    if tree is None:
        return ""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            st = path.lstat()
            h.update(f"{path.relative_to(tree)}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


def image_key(stack: Stack, rootfs: Path, builder: str) -> str:
    parts = [
        RECIPE,
        rootfs.name,
        stack.packages,
        builder,
        tree_digest(stack.tree),
        [tree_digest(source) for source in stack.local],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# building


def builder_env() -> dict[str, str]:
    """The builder runs from this checkout (not from whatever the venv has installed)."""
    return {**os.environ, "PYTHONPATH": str(REPO / "daemon")}


def local_package(source: Path, dest_dir: Path) -> Path:
    """`dpkg-deb --build` of one of our package source directories, into `dest_dir`."""
    deb = dest_dir / f"{source.name}.deb"
    deb.unlink(missing_ok=True)
    run("dpkg-deb", "--root-owner-group", "--build", source, deb, timeout=120)
    return deb


def builder_command(
    stack: Stack, base: Path, output: Path, local: Sequence[Path] = ()
) -> list[str]:
    cmd = [
        sys.executable,
        "-c",
        "from personalityd.client.cli import main; raise SystemExit(main())",
        "build",
        "--packages",
        *stack.packages,
        *(str(deb) for deb in local),
        "--name",
        stack.name,
        "-o",
        str(output),
        "--base",
        str(base),
        "--cache-dir",
        str(APT_CACHE),
        "--json",
    ]
    if stack.tree is not None:
        cmd += ["--tree", str(stack.tree)]
    return cmd


def build_stacks(
    base: Path, rootfs: Path, names: Sequence[str] = tuple(STACKS)
) -> dict[str, BuiltStack]:
    """Each stack's image, from the cache or built now (under a lock: one build at a time)."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    APT_CACHE.mkdir(parents=True, exist_ok=True)
    builder = builder_sources_digest()
    built = {}
    with open(IMAGE_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            built[name] = _cached_or_built(STACKS[name], base, rootfs, builder)
    return built


def _cached_or_built(stack: Stack, base: Path, rootfs: Path, builder: str) -> BuiltStack:
    key = image_key(stack, rootfs, builder)
    image = IMAGE_CACHE / f"{stack.name}-{key}.img"
    info_file = image.with_suffix(".build.json")
    files_file = image.with_suffix(".files.json")
    if not (image.exists() and info_file.exists() and files_file.exists()):
        for old in IMAGE_CACHE.glob(f"{stack.name}-*"):
            old.unlink()
        partial = image.with_name(f".{image.name}.{os.getpid()}")
        partial.unlink(missing_ok=True)
        local = [local_package(source, IMAGE_CACHE) for source in stack.local]
        proc = subprocess.run(
            builder_command(stack, base, partial, local),
            capture_output=True,
            text=True,
            timeout=1800,
            env=builder_env(),
            check=False,
        )
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise AssertionError(
                f"building the {stack.name} stack failed (exit {proc.returncode}):\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        try:
            info = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(
                f"build --json printed no JSON for {stack.name}:\n{proc.stdout[-2000:]}"
            ) from None
        files = list_image(partial, IMAGE_CACHE / f".extract-{os.getpid()}")
        files_file.write_text(json.dumps(files))
        info_file.write_text(json.dumps(info, indent=2))
        partial.rename(image)
    info = json.loads(info_file.read_text())
    files = {
        path: (kind, value) for path, (kind, value) in json.loads(files_file.read_text()).items()
    }
    return BuiltStack(stack, image, info, files)


def list_image(image: Path, scratch: Path) -> dict[str, Entry]:
    """Every entry of the image under the stacked hierarchies, from an extracted copy."""
    with open(image, "rb") as f:
        head = f.read(2048)
    shutil.rmtree(scratch, ignore_errors=True)  # only ever an extracted copy: no mounts
    if head[:4] == b"hsqs":
        run("unsquashfs", "-quiet", "-no-progress", "-d", scratch, image, timeout=900)
    elif head[1024:1028] == bytes.fromhex("e2e1f5e0"):
        run("fsck.erofs", f"--extract={scratch}", image, timeout=900)
    else:
        raise AssertionError(f"{image}: neither squashfs nor erofs")
    try:
        return tree_entries(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tree_entries(root: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for hierarchy in HIERARCHIES:
        top = root / hierarchy
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath) / name
                rel = "/" + str(path.relative_to(root))
                if path.is_symlink():
                    entries[rel] = ("symlink", os.readlink(path))
                elif path.is_dir():
                    entries[rel] = ("dir", "")
                elif path.is_file():
                    entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
                else:
                    entries[rel] = ("other", "")
    return entries


def expected_conflicts(order: Sequence[BuiltStack]) -> dict[str, dict[str, object]]:
    """The conflicts of these stacks attached in this order (last on top): paths that two or
    more provide, not all as directories; the winner is the topmost."""
    paths: set[str] = set()
    for built in order:
        paths.update(built.files)
    conflicts: dict[str, dict[str, object]] = {}
    for path in sorted(paths):
        providers = [b for b in reversed(order) if path in b.files]  # top first
        if len(providers) < 2:
            continue
        entries = [b.files[path] for b in providers]
        if all(kind == "dir" for kind, _ in entries):
            continue
        kinds = {kind for kind, _ in entries}
        identical = len(set(entries)) == 1 and kinds <= {"file", "symlink"}
        conflicts[path] = {
            "winner": providers[0].name,
            "shadowed": [b.name for b in providers[1:]],
            "identical": identical,
        }
    return conflicts
