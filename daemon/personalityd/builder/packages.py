"""`personalityctl build --packages`: a personality from the base's own packages.

The steps (docs/builder.md explains the result):

1. a scratch directory beside the output: `lower`, `upper`, `work`, `merged`, `debs`, `tree`;
2. under an flock of the download cache: `apt-get update` when the cached lists are stale,
   `apt-get install -s` (unknown packages, conflicts, base upgrades refused), then the real
   install with the maintainer scripts, all in the sandbox (`builder/sandbox.py`);
3. the upper is sorted (`core/upperplan`, `core/tmpfiles`, `core/accounts`,
   `core/unitorder`) and the image tree assembled from it, then the `--tree` directories;
4. `client/build.build_image` writes the image with its manifest, atomically.

Nothing is left at the output unless the whole build succeeded, and the scratch directory
is removed (nothing is mounted there outside the sandbox's namespaces).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from personalityd.builder import apt, sandbox
from personalityd.builder.report import BuildReport
from personalityd.builder.trees import copy_tree_over, strip_privileges
from personalityd.builder.upper import place, read_upper, write_file
from personalityd.client.build import (
    BuildError,
    ImageSpec,
    base_identity,
    build_image,
    check_spec,
    read_base_os_release,
)
from personalityd.core import accounts, aptout, tmpfiles, unitorder, upperplan

DEFAULT_CACHE_DIR: Final = Path("/var/cache/personalityd/build")
UNIT_DIRS: Final = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
APT_SOURCES: Final = ("etc/apt/sources.list", "etc/apt/sources.list.d")


@dataclass(frozen=True)
class PackageBuild:
    packages: tuple[str, ...]
    name: str
    output: Path
    base: Path = Path("/")
    trees: tuple[Path, ...] = ()
    allow_base_upgrades: bool = False
    fmt: str = "squashfs"
    image_version: str = ""
    cache_dir: Path = DEFAULT_CACHE_DIR


Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def _check_request(req: PackageBuild) -> None:
    if not req.packages:
        raise BuildError("--packages needs at least one package")
    check_spec(ImageSpec(name=req.name, image_version=req.image_version))
    if os.geteuid() != 0:
        raise BuildError(
            "build --packages needs root (it mounts an overlay and runs dpkg in a chroot)"
        )
    if not (req.base / "usr/bin/apt-get").exists() or not (req.base / "usr/bin/dpkg").exists():
        raise BuildError(f"{req.base}: no apt-get and dpkg there (a Debian-family base is needed)")
    for ch in ",:":
        if ch in str(req.base.resolve()) or ch in str(req.output.absolute().parent):
            raise BuildError(f"the base and output paths may not contain {ch!r} (overlayfs)")
    if not req.output.absolute().parent.is_dir():
        raise BuildError(f"{req.output.absolute().parent}: no such directory")
    if req.output.is_dir():
        raise BuildError(f"{req.output} is a directory")
    for tree in req.trees:
        if not tree.is_dir():
            raise BuildError(f"--tree {tree}: not a directory")


def _local_debs(packages: tuple[str, ...], debs: Path) -> list[str]:
    """apt-get arguments: names as they are, local .deb files copied into `debs`."""
    args = []
    for package in packages:
        if package.endswith(".deb") or package.startswith(("/", "./", "../")):
            path = Path(package)
            if not path.is_file():
                raise BuildError(f"{package}: no such .deb file")
            shutil.copyfile(path, debs / path.name)
            args.append(f"{sandbox.DEBS_IN_CHROOT}/{path.name}")
        elif package.startswith("-"):
            raise BuildError(f"invalid package name {package!r}")
        else:
            args.append(package)
    return args


def _lists_key(base: Path) -> str:
    """The base's apt sources (and architecture), hashed: one lists cache per set of sources."""
    digest = hashlib.sha256()
    for rel in APT_SOURCES:
        path = base / rel
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    arch = base / "var/lib/dpkg/arch"
    if arch.is_file():
        digest.update(arch.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def _cache_lock(cache: Path, progress: Progress) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build using {cache}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _workspace(req: PackageBuild, scratch: Path) -> sandbox.Layout:
    cache = req.cache_dir.absolute()
    lists = cache / "lists" / _lists_key(req.base)
    archives = cache / "archives"
    for d in (lists / "partial", archives / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    for sub in ("lower", "upper", "work", "merged", "debs", "tree"):
        (scratch / sub).mkdir(mode=0o755)
    return sandbox.Layout(
        base=str(req.base.resolve()),
        lower=str(scratch / "lower"),
        upper=str(scratch / "upper"),
        work=str(scratch / "work"),
        merged=str(scratch / "merged"),
        lists=str(lists),
        archives=str(archives),
        debs=str(scratch / "debs"),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _newer(upper: Path, base: Path, rel: str) -> str:
    """A file as the install left it: the upper's copy, else the base's."""
    return _read(upper / rel) if (upper / rel).exists() else _read(base / rel)


def _unit_text(roots: tuple[Path, ...], unit: str) -> str:
    """A unit file's text, from the first of `roots` that has it (a link followed once)."""
    for root in roots:
        for directory in UNIT_DIRS:
            path = root / directory / unit
            if path.is_symlink():
                target = os.readlink(path)
                if target.startswith("/"):
                    found = [
                        r / target.lstrip("/") for r in roots if (r / target.lstrip("/")).is_file()
                    ]
                    return _read(found[0]) if found else ""
                path = path.parent / target
            if path.is_file():
                return _read(path)
    return ""


def _ordered_services(units: list[str], roots: tuple[Path, ...]) -> list[str]:
    names = set(units) | {unitorder.template_of(u) for u in units}
    return unitorder.order_units(units, {u: _unit_text(roots, u) for u in names})


def _derived_version(requested: list[str], installed: list[aptout.Installed]) -> str:
    by_name = {p.package: p.version for p in installed}
    if len(requested) == 1 and requested[0] in by_name:
        return by_name[requested[0]]
    digest = hashlib.sha256("\n".join(f"{p.package}={p.version}" for p in installed).encode())
    return digest.hexdigest()[:12]


def _requested_names(run: apt.Runner, args: list[str]) -> list[str]:
    names = []
    for arg in args:
        if arg.startswith(sandbox.DEBS_IN_CHROOT):
            code, out = run(["dpkg-deb", "--field", arg, "Package"])
            names.append(out.strip() if code == 0 and out.strip() else Path(arg).name)
        else:
            names.append(arg.split("=", 1)[0].split("/", 1)[0])  # pkg=version, pkg/release
    return names


def _assemble(req: PackageBuild, layout: sandbox.Layout, report: BuildReport) -> Path:
    """The image tree from the upper; fills the report's lists."""
    upper, base, tree = Path(layout.upper), req.base, Path(layout.upper).parent / "tree"
    entries = list(read_upper(upper, base))
    result = upperplan.plan(entries)
    changes = accounts.diff_accounts(
        _read(base / "etc/passwd"),
        _read(base / "etc/group"),
        _newer(upper, base, "etc/passwd"),
        _newer(upper, base, "etc/group"),
    )
    all_users = accounts.parse_passwd(_newer(upper, base, "etc/passwd"))
    all_groups = accounts.parse_group(_newer(upper, base, "etc/group"))
    var = tmpfiles.var_plan(
        result.var,
        accounts.names_by_id(list(all_users.values())),
        accounts.names_by_id(list(all_groups.values())),
    )
    place(upper, tree, result.keep)
    factory = [(e, f"{tmpfiles.FACTORY}/{e.path}") for e in var.factory]
    place(upper, tree, factory)
    report.sysusers = accounts.sysusers_lines(changes, all_groups)
    report.tmpfiles = var.lines
    report.accounts_not_carried = list(changes.not_carried)
    header = f"# personality {req.name}: made by personalityctl build --packages\n"
    if report.sysusers:
        write_file(tree, f"usr/lib/sysusers.d/{req.name}.conf",
                   header + "".join(ln + "\n" for ln in report.sysusers))  # fmt: skip
    if report.tmpfiles:
        write_file(tree, f"usr/lib/tmpfiles.d/{req.name}.conf",
                   header + "".join(ln + "\n" for ln in report.tmpfiles))  # fmt: skip
    report.services = list(result.enabled)  # ordered once the tree is complete
    dropped = result.dropped + [(p, upperplan.R_VAR_BASE_FILE) for p in var.base_files]
    report.dropped = [{"path": p, "reason": r} for p, r in dropped]
    report.deletions_dropped = result.deletions
    report.overridden_base_files = result.overridden
    return tree


def _finish_tree(req: PackageBuild, tree: Path, report: BuildReport) -> None:
    for extra in req.trees:
        report.services += copy_tree_over(extra, tree)
    report.services = _ordered_services(report.services, (tree, req.base))
    setid, caps = strip_privileges(tree)
    report.setid_removed = [{"path": p, "mode": f"{m:04o}"} for p, m in sorted(setid)]
    report.capabilities_removed = sorted(caps)
    if not any((tree / d).is_dir() for d in upperplan.CARRIED_TOPS):
        raise BuildError("the packages left nothing a personality carries (usr/, etc/, opt/)")


def build_packages(
    req: PackageBuild, progress: Progress = _quiet, waiting: Progress = _quiet
) -> BuildReport:
    """Build the image `req` asks for; BuildError (one line) when it cannot. `progress` hears
    of each step, `waiting` that another build holds the download cache."""
    _check_request(req)
    output = req.output.absolute()
    report = BuildReport(req.name, str(output), req.fmt, base=str(req.base))
    old_umask = os.umask(0o022)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".personalityctl-build-", dir=output.parent))
    except OSError as exc:
        raise BuildError(f"cannot write to {output.parent}: {exc.strerror}") from None
    try:
        scratch.chmod(0o755)
        layout = _workspace(req, scratch)
        run = apt.chroot_runner(layout)
        args = _local_debs(req.packages, Path(layout.debs))
        with _cache_lock(req.cache_dir, waiting):
            if apt.update_if_stale(run, Path(layout.lists)):
                progress("updated the package lists")
            actions = apt.simulate(run, args)
            report.requested = _requested_names(run, args)
            upgrades = apt.check_base_changes(run, args, actions, req.allow_base_upgrades)
            report.base_upgrades = [
                {"name": a.package, "base": a.installed, "new": a.version} for a in upgrades
            ]
            if not actions:
                raise BuildError(
                    f"nothing to install: {' '.join(req.packages)} already in the base"
                )
            progress(f"installing {len(actions)} package(s)")
            apt.install(run, args)
        installed = aptout.installed_by_build(
            _read(req.base / "var/lib/dpkg/status"),
            _read(Path(layout.upper) / "var/lib/dpkg/status"),
        )
        report.packages = [
            {"name": p.package, "version": p.version, "architecture": p.architecture}
            for p in installed
        ]
        tree = _assemble(req, layout, report)
        _finish_tree(req, tree, report)
        report.image_version = req.image_version or _derived_version(report.requested, installed)
        os_id, version_id = base_identity(read_base_os_release(req.base))
        spec = ImageSpec(
            name=req.name,
            os_id=os_id,
            version_id=version_id,
            image_version=report.image_version,
            description=f"Debian packages: {' '.join(report.requested)}",
            services=tuple(report.services),
        )
        progress("writing the image")
        build_image(tree, output, spec, req.fmt)
        return report
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{exc.cmd[0]} took longer than {exc.timeout:.0f} s") from None
    finally:
        os.umask(old_umask)
        _remove_scratch(scratch)


def _remove_scratch(scratch: Path) -> None:
    """rm -rf of the scratch directory, unless something is mounted below it here."""
    prefix = str(scratch) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                print(f"personalityctl: left {scratch} (mounted: {point})", file=sys.stderr)
                return
    # The upper holds whiteouts (character devices) and directories the scripts made 0700:
    # root removes them all.
    shutil.rmtree(scratch, ignore_errors=True)
    if scratch.exists():
        for dirpath, _dirs, _files in os.walk(scratch):
            os.chmod(dirpath, stat.S_IRWXU)
        shutil.rmtree(scratch, ignore_errors=True)
