"""`volume_mount_options`: always read-only, and every filesystem that could replay a journal or
log gets the option that stops it (docs/configuration.md, volumes.mount_options)."""

from __future__ import annotations

import pytest

from personalityd.adapters.probe import SUPPORTED_FS_TYPES, volume_mount_options

DEFAULT = ("ro", "nodev", "nosuid")


@pytest.mark.parametrize(
    ("fs_type", "added"),
    [
        ("ext4", ("norecovery",)),
        ("ext3", ("norecovery",)),
        ("xfs", ("norecovery",)),
        ("btrfs", ("rescue=nologreplay",)),
        ("ext2", ()),
        ("vfat", ()),
        ("squashfs", ()),
        ("erofs", ()),
    ],
)
def test_no_replay_option_per_filesystem(fs_type: str, added: tuple[str, ...]) -> None:
    assert volume_mount_options(fs_type, DEFAULT) == (*DEFAULT, *added)


def test_every_supported_filesystem_is_covered() -> None:
    covered = {"ext4", "ext3", "xfs", "btrfs", "ext2", "vfat", "squashfs", "erofs"}
    assert set(SUPPORTED_FS_TYPES) == covered


def test_read_only_forced_and_nothing_doubled() -> None:
    assert volume_mount_options("btrfs", ("rw", "nodev", "rescue=nologreplay")) == (
        "nodev",
        "rescue=nologreplay",
        "ro",
    )
    assert volume_mount_options("xfs", ("norecovery",)) == ("norecovery", "ro")
