from __future__ import annotations

import pytest

from personalityd.core.errors import InvalidName
from personalityd.core.manifest import (
    EXTENSION_RELEASE_DIRS,
    MANIFEST_PREFIX,
    check_compatibility,
    manifest_name_from_filename,
    parse_manifest,
)
from personalityd.core.model import Manifest, OsRelease

DEBIAN = OsRelease(id="debian", version_id="12", architecture="x86-64")
UBUNTU = OsRelease(id="ubuntu", id_like=("debian",), version_id="24.04", architecture="arm64")
LEVELLED = OsRelease(id="fedora", version_id="40", sysext_level="1.0", architecture="x86-64")
ROLLING = OsRelease(id="arch", architecture="x86-64")


def test_constants() -> None:
    assert EXTENSION_RELEASE_DIRS == ("usr/lib/extension-release.d", "etc/extension-release.d")
    assert MANIFEST_PREFIX == "extension-release."


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("extension-release.web", "web"),
        ("usr/lib/extension-release.d/extension-release.base-tools", "base-tools"),
        ("extension-release.a.b", "a.b"),
        ("extension-release.", None),
        ("os-release", None),
        ("extension-release", None),
        ("xextension-release.web", None),
        # Not validated here: parse_manifest refuses it with a reason.
        ("extension-release.-bad", "-bad"),
    ],
)
def test_manifest_name_from_filename(filename: str, expected: str | None) -> None:
    assert manifest_name_from_filename(filename) == expected


def test_parse_manifest() -> None:
    text = """\
ID=debian
VERSION_ID=12
IMAGE_VERSION="1.2.3"
PERSONALITY_DESCRIPTION="Web server tools"
PERSONALITY_SERVICES="nginx.service  php-fpm.service"
"""
    manifest = parse_manifest("web", text)
    assert manifest.name == "web"
    assert manifest.get("ID") == "debian"
    assert manifest.version == "1.2.3"
    assert manifest.description == "Web server tools"
    assert manifest.services == ("nginx.service", "php-fpm.service")


@pytest.mark.parametrize("name", ["", "-web", "web/x", "a" * 65, "wéb", ".hidden"])
def test_parse_manifest_refuses_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        parse_manifest(name, "ID=debian\n")


def manifest(**fields: str) -> Manifest:
    return Manifest(name="test", fields=fields)


@pytest.mark.parametrize(
    ("fields", "base", "reason"),
    [
        # ID
        ({"ID": "debian"}, DEBIAN, None),
        ({"ID": "debian", "VERSION_ID": "12"}, DEBIAN, None),
        ({"ID": "_any"}, DEBIAN, None),
        ({"ID": "debian"}, UBUNTU, None),  # via ID_LIKE
        ({"ID": "ubuntu", "VERSION_ID": "24.04"}, UBUNTU, None),
        (
            {"ID": "fedora"},
            DEBIAN,
            "ID 'fedora' does not match the base ID 'debian' (ID_LIKE: )",
        ),
        (
            {"ID": "fedora"},
            UBUNTU,
            "ID 'fedora' does not match the base ID 'ubuntu' (ID_LIKE: debian)",
        ),
        ({}, DEBIAN, "manifest has no ID"),
        ({"ID": ""}, DEBIAN, "manifest has no ID"),
        # SYSEXT_LEVEL when both set, then VERSION_ID only when the manifest sets it.
        ({"ID": "fedora", "SYSEXT_LEVEL": "1.0", "VERSION_ID": "39"}, LEVELLED, None),
        (
            {"ID": "fedora", "SYSEXT_LEVEL": "2.0", "VERSION_ID": "40"},
            LEVELLED,
            "SYSEXT_LEVEL '2.0' does not match the base SYSEXT_LEVEL '1.0'",
        ),
        (
            {"ID": "fedora", "VERSION_ID": "39"},
            LEVELLED,
            "VERSION_ID '39' does not match the base VERSION_ID '40'",
        ),
        (
            {"ID": "debian", "SYSEXT_LEVEL": "1.0", "VERSION_ID": "11"},
            DEBIAN,
            "VERSION_ID '11' does not match the base VERSION_ID '12'",
        ),
        (
            {"ID": "debian", "VERSION_ID": "11"},
            DEBIAN,
            "VERSION_ID '11' does not match the base VERSION_ID '12'",
        ),
        ({"ID": "debian", "VERSION_ID": ""}, DEBIAN, None),
        ({"ID": "arch", "VERSION_ID": "2024"}, ROLLING, None),  # rolling base: no version
        ({"ID": "_any", "VERSION_ID": "11"}, DEBIAN, None),  # _any skips version checks
        # ARCHITECTURE
        ({"ID": "debian", "ARCHITECTURE": "x86-64"}, DEBIAN, None),
        ({"ID": "debian", "ARCHITECTURE": "_any"}, DEBIAN, None),
        ({"ID": "debian", "ARCHITECTURE": ""}, DEBIAN, None),
        (
            {"ID": "debian", "ARCHITECTURE": "arm64"},
            DEBIAN,
            "ARCHITECTURE 'arm64' does not match the base architecture 'x86-64'",
        ),
        (
            {"ID": "_any", "ARCHITECTURE": "x86-64"},
            UBUNTU,
            "ARCHITECTURE 'x86-64' does not match the base architecture 'arm64'",
        ),
    ],
)
def test_check_compatibility(fields: dict[str, str], base: OsRelease, reason: str | None) -> None:
    got = check_compatibility(manifest(**fields), base)
    if reason is None:
        assert got is None
    else:
        assert got is not None
        assert got.startswith(reason)
