"""`personalityctl build`: from a directory tree, or (`--packages`) from the base's packages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from personalityd.builder.packages import DEFAULT_CACHE_DIR, PackageBuild, build_packages
from personalityd.client.build import (
    FORMATS,
    BuildError,
    ImageSpec,
    base_identity,
    build_image,
    read_base_os_release,
)
from personalityd.client.connection import CliError

PROG: Final = "personalityctl"


class UsageError(Exception):
    """A command line that does not make sense (exit status 2)."""


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def verb_build(args: argparse.Namespace) -> int:
    if args.packages is not None:
        return verb_build_packages(args)
    if args.dir is None:
        raise UsageError("build needs DIR, or --packages PKG...")
    for flag, given in (
        ("--base", args.base),
        ("--tree", args.trees),
        ("--allow-base-upgrades", args.allow_base_upgrades),
        ("--cache-dir", args.cache_dir),
    ):
        if given:
            raise UsageError(f"{flag} is for build --packages")
    base_id, base_version_id = base_identity(read_base_os_release())
    if args.os_id is not None:  # another base: take nothing from ours
        os_id, version_id = args.os_id, args.version_id or ""
    else:
        os_id = base_id
        version_id = args.version_id if args.version_id is not None else base_version_id
    spec = ImageSpec(
        name=args.name,
        os_id=os_id,
        version_id=version_id,
        image_version=args.image_version or "",
        description=args.description or "",
        services=tuple(args.services.replace(",", " ").split()) if args.services else (),
    )
    try:
        build_image(Path(args.dir), Path(args.output), spec, args.format)
    except BuildError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.filename or args.output}: {exc.strerror}") from None
    if args.json:
        _print_json({"name": spec.name, "image": str(Path(args.output).absolute()),
                     "format": args.format})  # fmt: skip
    else:
        print(f"Wrote {args.output} ({args.format}): personality {spec.name}.")
    return 0


def verb_build_packages(args: argparse.Namespace) -> int:
    if args.dir is not None:
        raise UsageError("a build with --packages takes no DIR")
    for flag, given in (
        ("--id", args.os_id),
        ("--version-id", args.version_id),
        ("--description", args.description),
        ("--services", args.services),
    ):
        if given is not None:
            raise UsageError(
                f"{flag} is not for build --packages (it comes from the base and the packages)"
            )
    req = PackageBuild(
        packages=tuple(args.packages),
        name=args.name,
        output=Path(args.output),
        base=Path(args.base or "/"),
        trees=tuple(Path(t) for t in args.trees or ()),
        allow_base_upgrades=args.allow_base_upgrades,
        fmt=args.format,
        image_version=args.image_version or "",
        cache_dir=Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR,
    )

    def progress(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def steps(message: str) -> None:  # what it is doing, for someone watching
        if sys.stderr.isatty():
            progress(message)

    try:
        report = build_packages(req, steps, waiting=progress)
    except BuildError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.filename or args.output}: {exc.strerror}") from None
    if args.json:
        _print_json(report.as_json())
    else:
        print(report.as_text(list_overrides=args.allow_base_upgrades))
    return 0


def add_build_verb(verbs: Any) -> None:
    """The `build` subcommand on `verbs` (argparse's subparsers)."""
    build = verbs.add_parser(
        "build",
        help="Make a personality image from a directory tree, or from packages.",
        description="Make a personality image (squashfs or erofs) from DIR, a root-relative "
        "tree such as DIR/usr/bin/tool, with its manifest "
        "usr/lib/extension-release.d/extension-release.NAME. DIR is not modified. "
        "With --packages PKG... (and no DIR), install the packages with the base's apt and "
        "dpkg into an overlay over the base and make the image from what they add.",
    )
    build.add_argument("dir", metavar="DIR", nargs="?")
    build.add_argument(
        "--packages",
        metavar="PKG",
        nargs="+",
        help="packages to install (names, or paths of local .deb files)",
    )
    build.add_argument(
        "--base", metavar="DIR", help="the base to install over (default: /); never written"
    )
    build.add_argument(
        "--tree",
        metavar="DIR",
        dest="trees",
        action="append",
        help="copy DIR over the result after the packages (repeatable)",
    )
    build.add_argument(
        "--allow-base-upgrades",
        action="store_true",
        help="let packages bring newer versions of the base's packages (listed, with the "
        "base files they override)",
    )
    build.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"download cache of apt lists and packages (default: {DEFAULT_CACHE_DIR})",
    )
    build.add_argument("--json", action="store_true", help="print what was built as JSON")
    build.add_argument("--name", required=True, help="the personality's name")
    build.add_argument("-o", "--output", metavar="IMAGE", required=True, help="image to write")
    build.add_argument("--format", choices=FORMATS, default="squashfs", help="(default: squashfs)")
    build.add_argument(
        "--version", dest="image_version", metavar="V", help="IMAGE_VERSION, shown as its version"
    )
    build.add_argument(
        "--id",
        dest="os_id",
        metavar="ID",
        help="the base's os-release ID it is made for (default: this system's, or _any)",
    )
    build.add_argument(
        "--version-id",
        metavar="V",
        help="the base's VERSION_ID it is made for (default: this system's unless --id)",
    )
    build.add_argument("--description", metavar="TEXT", help="PERSONALITY_DESCRIPTION")
    build.add_argument(
        "--services",
        metavar="UNITS",
        help="units to start after attach and stop before detach, space- or comma-separated",
    )
    build.set_defaults(local_verb=verb_build)
