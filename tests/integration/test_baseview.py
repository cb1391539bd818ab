"""adapters/baseview.py on real overlays: files under an overlay of ours are read from the base
below it, symlinks and all, and the mounts of this namespace stay exactly as they were."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from personalityd.adapters.baseview import in_base, load_base_settings, read_os_release
from personalityd.core.errors import ConfigError
from testkit.images import OPAQUE, FileSpec, write_tree
from testkit.mounts import mountinfo, unmount_tree

pytestmark = pytest.mark.integration


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/root`, a base with /etc and /usr; everything mounted in it goes after."""
    root = tmp_path / "root"
    write_tree(
        root,
        {
            "usr/lib/os-release": "ID=base\n",
            "usr/lib/personalityd/personalityd.toml": "[stack]\nmax_layers = 7\n",
            "etc/os-release": ("symlink", "../usr/lib/os-release"),
            "etc/personalityd/personalityd.toml": "[stack]\nswap = 'replace'\n",
            "etc/motd": "base motd\n",
        },
    )
    try:
        yield root
    finally:
        unmount_tree(tmp_path)


def stack(tmp_path: Path, target: Path, files: Mapping[str, FileSpec], source: str) -> None:
    """An overlay of `files` over `target`, mounted as the daemon mounts them (`source`)."""
    layer = Path(tempfile.mkdtemp(prefix=f"layer-{target.name}-", dir=tmp_path))
    write_tree(layer, files)
    options = f"lowerdir={layer}:{target},redirect_dir=off,index=off,metacopy=off,xino=off"
    subprocess.run(
        ["mount", "-t", "overlay", source, "-o", options, str(target)],
        check=True,
        capture_output=True,
    )


HOSTILE_ETC: dict[str, FileSpec] = {
    "personalityd/personalityd.toml.d/50-x.toml": "[spool]\ndir = '/tmp'\n",
    "personalityd/personalityd.toml": "[stack]\nswap = 'beneath'\n",
    "motd": "stacked motd\n",
}
HOSTILE_USR: dict[str, FileSpec] = {
    "lib": OPAQUE,
    "lib/personalityd/personalityd.toml": "[stack]\nmax_layers = 9\n",
}


def test_reads_below_our_overlays(tree: Path, tmp_path: Path) -> None:
    stack(tmp_path, tree / "etc", HOSTILE_ETC, "personalityd")
    stack(tmp_path, tree / "usr", HOSTILE_USR, "personalityd")
    # Through the stack: the hostile configuration, and no os-release at all.
    assert (tree / "etc/personalityd/personalityd.toml.d/50-x.toml").exists()
    assert read_os_release(tree) is None
    before = mountinfo()

    settings = load_base_settings(None, str(tree))

    assert settings.os_release == "ID=base\n"  # through the base's own symlink
    config = settings.config
    assert (config.max_layers, config.swap, config.spool_dir) == (
        7,
        "replace",
        "/var/spool/personalityd",
    )
    assert settings.warnings == []
    assert mountinfo() == before  # nothing changed here: the child had a namespace of its own
    assert (tree / "etc/motd").read_text() == "stacked motd\n"
    assert in_base(lambda: (tree / "etc/motd").read_text()) == "base motd\n"


def test_overlays_of_others_are_read_through(tree: Path, tmp_path: Path) -> None:
    stack(tmp_path, tree / "etc", {"motd": "someone else's\n"}, "other")
    assert in_base(lambda: (tree / "etc/motd").read_text()) == "someone else's\n"
    assert in_base(os.getpid) == os.getpid()  # no overlay of ours: read right here


def test_two_overlays_of_ours_on_one_hierarchy(tree: Path, tmp_path: Path) -> None:
    """A crash between the two steps of a swap leaves two stacks: both are below the base."""
    stack(tmp_path, tree / "etc", {"motd": "old stack\n"}, "personalityd")
    stack(tmp_path, tree / "etc", {"motd": "new stack\n"}, "personalityd")
    assert in_base(lambda: (tree / "etc/motd").read_text()) == "base motd\n"
    assert in_base(os.getpid) != os.getpid()


def test_errors_come_back(tree: Path, tmp_path: Path) -> None:
    write_tree(tree, {"etc/personalityd/personalityd.toml.d/10-bad.toml": "[stack\n"})
    stacked = {"personalityd/given.toml": "", "personalityd/personalityd.toml.d/10-bad.toml": ""}
    stack(tmp_path, tree / "etc", stacked, "personalityd")
    given = str(tree / "etc/personalityd/given.toml")
    assert os.path.exists(given)  # through the stack, not in the base
    with pytest.raises(ConfigError, match=f"^{given}: no such file$"):
        load_base_settings(given, str(tree))
    with pytest.raises(ConfigError, match=r"10-bad\.toml: invalid TOML"):
        load_base_settings(None, str(tree))
