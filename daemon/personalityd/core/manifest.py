"""Personality manifests (systemd-sysext extension-release files) and base compatibility."""

from __future__ import annotations

from personalityd.core.model import Manifest, OsRelease
from personalityd.core.names import check_name
from personalityd.core.osrelease import parse_os_release

# Where a volume keeps its manifest, relative to the volume's root, in lookup order.
EXTENSION_RELEASE_DIRS = ("usr/lib/extension-release.d", "etc/extension-release.d")
MANIFEST_PREFIX = "extension-release."

ANY = "_any"


def manifest_name_from_filename(filename: str) -> str | None:
    """`extension-release.web` -> `web`; None for a file that is not a manifest.

    The name is not validated here: `parse_manifest` refuses a bad one with a reason.
    """
    base = filename.rpartition("/")[2]
    if not base.startswith(MANIFEST_PREFIX):
        return None
    return base[len(MANIFEST_PREFIX) :] or None


def parse_manifest(name: str, text: str) -> Manifest:
    """The manifest of personality `name`; raises InvalidName for a bad name."""
    return Manifest(name=check_name(name), fields=parse_os_release(text))


def check_compatibility(manifest: Manifest, base: OsRelease) -> str | None:
    """None when `manifest` may be stacked on `base`, else the reason (systemd-sysext rules).

    `ID` must equal the base's, be listed in its `ID_LIKE`, or be `_any` (which skips the
    version checks, as in systemd); then `SYSEXT_LEVEL` when both set it, else `VERSION_ID`
    when the manifest sets it and the base has one (a base without either is a rolling
    release); `ARCHITECTURE`, when set, must be the base's or `_any`. Empty values are unset.
    """
    ext_id = manifest.get("ID") or ""
    id_like = " ".join(base.id_like)
    if not ext_id:
        return (
            f"manifest has no ID (expected the base ID {base.id!r}, one of its ID_LIKE "
            f"({id_like}), or {ANY!r})"
        )
    if ext_id != ANY:
        if ext_id != base.id and ext_id not in base.id_like:
            return f"ID {ext_id!r} does not match the base ID {base.id!r} (ID_LIKE: {id_like})"
        reason = _check_version(manifest, base)
        if reason is not None:
            return reason
    arch = manifest.get("ARCHITECTURE") or ""
    if arch and arch != ANY and arch != base.architecture:
        return f"ARCHITECTURE {arch!r} does not match the base architecture {base.architecture!r}"
    return None


def _check_version(manifest: Manifest, base: OsRelease) -> str | None:
    level = manifest.get("SYSEXT_LEVEL") or ""
    if level and base.sysext_level:
        if level != base.sysext_level:
            return (
                f"SYSEXT_LEVEL {level!r} does not match the base SYSEXT_LEVEL {base.sysext_level!r}"
            )
        return None
    version_id = manifest.get("VERSION_ID") or ""
    if version_id and base.version_id and version_id != base.version_id:
        return f"VERSION_ID {version_id!r} does not match the base VERSION_ID {base.version_id!r}"
    return None
