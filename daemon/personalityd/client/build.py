"""Making a personality image from a directory tree: `personalityctl build`.

The source tree is never modified: it is hard-linked (or, across file systems, copied with
reflinks where possible) into a temporary directory beside the output, the manifest is added
there, and mksquashfs or mkfs.erofs writes the image, which replaces the output atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from personalityd.core.errors import InvalidName
from personalityd.core.names import check_name
from personalityd.core.osrelease import parse_os_release

FORMATS: Final = ("squashfs", "erofs")
MANIFEST_DIR: Final = "usr/lib/extension-release.d"
HIERARCHY_DIRS: Final = ("usr", "etc", "opt")
OS_RELEASE_PATHS: Final = ("etc/os-release", "usr/lib/os-release")
ANY_ID: Final = "_any"
LABEL_PREFIX: Final = "personality-"
EROFS_LABEL_MAX: Final = 15  # the superblock's volume name holds 16 bytes, NUL included

_BARE_VALUE = re.compile(r"[A-Za-z0-9._~:/@+,=-]+")
_ID_VALUE = re.compile(r"[a-z0-9._-]+|_any")
_VERSION_VALUE = re.compile(r"[A-Za-z0-9._~+:-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.[a-z]+")


class BuildError(Exception):
    """The image cannot be built; `str()` is the one line shown to the user."""


@dataclass(frozen=True)
class ImageSpec:
    """What goes into the manifest."""

    name: str
    os_id: str = ANY_ID
    version_id: str = ""  # empty: no VERSION_ID line
    image_version: str = ""
    description: str = ""
    services: tuple[str, ...] = ()


# -- pure -----------------------------------------------------------------------------------


def quote_value(value: str) -> str:
    """An os-release value: bare when that is unambiguous, else double-quoted and escaped."""
    if _BARE_VALUE.fullmatch(value):
        return value
    escaped = re.sub(r'([\\"$`])', r"\\\1", value)
    return f'"{escaped}"'


def check_spec(spec: ImageSpec) -> None:
    """Raise BuildError for a spec that would make a manifest the daemon cannot read."""
    try:
        check_name(spec.name)
    except InvalidName as exc:
        raise BuildError(str(exc)) from None
    if not _ID_VALUE.fullmatch(spec.os_id):
        raise BuildError(f"invalid ID {spec.os_id!r}: lower-case letters, digits, '._-', or _any")
    for key, value in (("VERSION_ID", spec.version_id), ("IMAGE_VERSION", spec.image_version)):
        if value and not _VERSION_VALUE.fullmatch(value):
            raise BuildError(f"invalid {key} {value!r}: letters, digits and '._~+:-' only")
    if _CONTROL.search(spec.description):
        raise BuildError("the description must be one line of printable text")
    for unit in spec.services:
        if not _UNIT_NAME.fullmatch(unit):
            raise BuildError(f"invalid unit name {unit!r} in --services")


def manifest_text(spec: ImageSpec) -> str:
    """The extension-release file for `spec` (os-release syntax)."""
    fields: list[tuple[str, str]] = [("ID", spec.os_id)]
    if spec.version_id:
        fields.append(("VERSION_ID", spec.version_id))
    if spec.image_version:
        fields.append(("IMAGE_VERSION", spec.image_version))
    if spec.description:
        fields.append(("PERSONALITY_DESCRIPTION", spec.description))
    if spec.services:
        fields.append(("PERSONALITY_SERVICES", " ".join(spec.services)))
    return "".join(f"{key}={quote_value(value)}\n" for key, value in fields)


def manifest_path(name: str) -> str:
    """Where the manifest lives in the image, relative to its root."""
    return f"{MANIFEST_DIR}/extension-release.{name}"


def base_identity(os_release: Mapping[str, str]) -> tuple[str, str]:
    """(ID, VERSION_ID) for a manifest made on a base with this os-release."""
    return os_release.get("ID") or ANY_ID, os_release.get("VERSION_ID", "")


def erofs_label(name: str) -> str | None:
    """`personality-NAME` when it fits in an erofs volume name, else None."""
    label = LABEL_PREFIX + name
    return label if len(label.encode()) <= EROFS_LABEL_MAX else None


# -- file system and tools ------------------------------------------------------------------


def read_base_os_release(root: Path = Path("/")) -> dict[str, str]:
    """The base's os-release (/etc/os-release, else /usr/lib/os-release); empty if neither."""
    for rel in OS_RELEASE_PATHS:
        try:
            return parse_os_release((root / rel).read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            continue
    return {}


def check_source_tree(source: Path) -> None:
    """Raise BuildError unless `source` looks like a personality tree (not a whole OS)."""
    if not source.is_dir():
        raise BuildError(f"{source}: not a directory")
    for rel in OS_RELEASE_PATHS:
        if os.path.lexists(source / rel):
            raise BuildError(
                f"{source} has {rel}: it looks like a whole OS tree, "
                "a personality holds only what it adds to the base"
            )
    if not any((source / d).is_dir() and not (source / d).is_symlink() for d in HIERARCHY_DIRS):
        raise BuildError(
            f"{source} has none of the top-level directories usr/, etc/, opt/: "
            "a personality is a root-relative tree such as usr/bin/tool"
        )
    for rel in (MANIFEST_DIR, "etc/extension-release.d"):
        directory = source / rel
        if directory.is_dir():
            found = sorted(p.name for p in directory.iterdir() if p.name.startswith("extension"))
            if found:
                raise BuildError(
                    f"{source} already has a manifest ({rel}/{found[0]}); "
                    "remove it, build writes its own"
                )


def _run(argv: Sequence[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found; install {what}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BuildError(f"{argv[0]} failed: {detail}")


def _stage_tree(source: Path, staging: Path) -> None:
    """Make `staging` a copy of `source`: hard links when possible, else a (reflink) copy."""
    staging.mkdir()
    hardlinked = subprocess.run(
        ["cp", "-a", "-l", "--", f"{source}/.", f"{staging}/"],
        capture_output=True,
        check=False,
    )
    if hardlinked.returncode != 0:  # another file system, or protected_hardlinks
        shutil.rmtree(staging)
        staging.mkdir()
        _run(["cp", "-a", "--reflink=auto", "--", f"{source}/.", f"{staging}/"], "coreutils")
    staging.chmod(0o755)


def _make_dirs(root: Path, rel: Path) -> None:
    """mkdir -p with mode 0755 whatever the umask: the image is read by everyone."""
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            # A symlink could lead the manifest out of the staging tree, even onto the host.
            raise BuildError(f"{path.relative_to(root)} in the source is not a directory")
        if not path.exists():
            path.mkdir()
            path.chmod(0o755)


def _erofs_supports_label() -> bool:
    """erofs-utils before 1.6 has no -L."""
    try:
        proc = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return False  # _run says so next
    return re.search(r"^\s*-L\b", proc.stdout + proc.stderr, re.MULTILINE) is not None


def build_image(source: Path, output: Path, spec: ImageSpec, fmt: str = "squashfs") -> None:
    """Write a personality image of `source` with the manifest for `spec` to `output`."""
    if fmt not in FORMATS:
        raise BuildError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    check_spec(spec)
    check_source_tree(source)
    source = source.resolve()
    output = output.absolute()
    if output.resolve().is_relative_to(source):
        raise BuildError(f"the output {output} must not be inside {source}")
    if not output.parent.is_dir():
        raise BuildError(f"{output.parent}: no such directory")
    if output.is_dir():
        raise BuildError(f"{output} is a directory")

    try:
        work = Path(tempfile.mkdtemp(prefix=".personalityctl-build-", dir=output.parent))
    except OSError as exc:
        raise BuildError(f"cannot write to {output.parent}: {exc.strerror}") from None
    try:
        staging = work / "root"
        _stage_tree(source, staging)
        target = staging / manifest_path(spec.name)
        _make_dirs(staging, target.parent.relative_to(staging))
        # O_EXCL|O_NOFOLLOW: never write through a link into the source or elsewhere.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as manifest:
            manifest.write(manifest_text(spec))
        target.chmod(0o644)
        image = work / "image"
        if fmt == "squashfs":
            argv = ["mksquashfs", str(staging), str(image), "-noappend", "-all-root", "-quiet"]
            _run(argv, "squashfs-tools")
        else:
            argv = ["mkfs.erofs", "--quiet", "--all-root"]
            label = erofs_label(spec.name)
            if label is not None and _erofs_supports_label():
                argv += ["-L", label]
            _run([*argv, str(image), str(staging)], "erofs-utils")
        image.chmod(0o644)
        os.replace(image, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
