"""From systemd-sysext to personalityd (`images.sysext_paths`, docs/images.md), against the
real systemd-sysext of this machine (systemd 252) on the same sandbox root.

- Migration: the images `systemd-sysext merge` accepts, in its own directories, are served by
  personalityd unchanged: the same entries found, all attached through its own loop devices,
  and the stacked /usr equal, file for file, to what systemd-sysext's merge showed.
- Coexistence: with a systemd-sysext merge active on /usr, personalityd says so once at start
  (log, the `Notices` property, `personalityctl status`), and its own stack stays intact and
  readable when `systemd-sysext refresh` and `unmerge` run under it.

How systemd-sysext is made to run here (no systemd as PID 1, a private mount namespace) is
described in testkit/testkit/sysext.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dbus_fast.aio import MessageBus
from image_entries import install, search_dir
from sandbox_view import Images, ok, read, stacked_overlays
from served_daemon import Serve, wait_listed

from testkit.daemon import Daemon
from testkit.dbus import get_property
from testkit.images import FileSpec, format_os_release, write_tree
from testkit.mounts import mountinfo
from testkit.polling import wait_for
from testkit.sandbox import BASE_TOOL_BYTES
from testkit.sysext import (
    DEBIAN_12,
    META_DIR,
    build_sysext,
    extension_dir,
    file_identity,
    install_sysext,
    listed_extensions,
    loops_on_files,
    merged_extensions,
    shared_root,
    sysext,
    sysext_ok,
)

SYSEXT_MERGED = "event=sysext_merged"
# What personalityd's notice starts with (daemon.py, sysext_notice).
NOTICE_START = "systemd-sysext has extensions merged on /usr"

Tree = dict[str, tuple[str, bytes, int]]  # usr-relative path -> (kind, content, mode)


def usr_tree(root: Path) -> Tree:
    """Everything under `root/usr` as a user sees it (systemd-sysext's metadata left out):
    path -> (kind, content or symlink target, permission bits)."""
    usr = root / "usr"
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(usr):
        here = Path(dirpath)
        if here == usr and META_DIR in dirnames:
            dirnames.remove(META_DIR)
        for name in dirnames + filenames:
            path = here / name
            rel = str(path.relative_to(usr))
            st = os.lstat(path)
            mode = st.st_mode & 0o7777
            if path.is_symlink():
                tree[rel] = ("symlink", os.readlink(path).encode(), mode)
            elif path.is_dir():
                tree[rel] = ("dir", b"", mode)
            else:
                tree[rel] = ("file", path.read_bytes(), mode)
    return tree


def sysext_images(tmp_path: Path, root: Path) -> tuple[dict[str, Path], Path]:
    """Extensions in every one of systemd-sysext's directories under `root`: name -> entry
    (five image files and one directory tree), and `other.raw`, built for Fedora."""
    shared = "usr/share/common/tool"
    entries: dict[str, tuple[str, dict[str, FileSpec]]] = {
        "alpha": ("/var/lib/extensions", {"usr/bin/alpha": "#!/bin/sh\necho alpha\n",
                                          shared: "alpha\n"}),
        "beta": ("/var/lib/extensions", {"usr/bin/beta": "#!/bin/sh\necho beta\n",
                                         shared: "beta\n", "usr/lib/beta/libbeta.so.1": "ELF"}),
        "delta": ("/usr/lib/extensions", {"usr/share/delta/doc": "delta\n",
                                          "usr/bin/delta-link": ("symlink", "alpha")}),
        "epsilon": ("/run/extensions", {"usr/bin/epsilon": "#!/bin/sh\necho epsilon\n"}),
        "zeta": ("/usr/local/lib/extensions", {"usr/share/zeta/z": "zeta\n"}),
    }  # fmt: skip
    found: dict[str, Path] = {}
    for name, (directory, files) in entries.items():
        manifest = {"ID": "_any"} if name == "epsilon" else DEBIAN_12
        built = build_sysext(tmp_path, name, files, manifest)
        found[name] = install_sysext(built, extension_dir(root, directory), f"{name}.raw")
    gamma = extension_dir(root, "/etc/extensions") / "gamma"
    release = format_os_release({**DEBIAN_12, "IMAGE_VERSION": "3"})
    write_tree(gamma, {"usr/share/gamma/g": "gamma\n",
                       "usr/lib/extension-release.d/extension-release.gamma": release})  # fmt: skip
    found["gamma"] = gamma
    fedora = build_sysext(tmp_path, "other", {"usr/bin/other": "other\n"}, {"ID": "fedora"})
    install_sysext(fedora, extension_dir(root), "other.raw")
    return found, root / "var/lib/extensions/other.raw"


def entry_state(path: Path) -> tuple[int, int, str]:
    """An entry as it is on disk: inode, mtime, and a digest of the file (of the directory
    tree's listing and contents, for a directory entry). Read with nothing stacked on /usr."""
    digest = hashlib.sha256()
    if path.is_dir():
        for rel, (kind, content, mode) in sorted(usr_tree(path).items()):
            digest.update(f"{rel}\0{kind}\0{mode}\0".encode() + content)
    else:
        digest.update(path.read_bytes())
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, digest.hexdigest()


async def test_the_directories_systemd_sysext_merges_are_served_unchanged(
    serve: Serve, daemon: Daemon, client: MessageBus, sandbox_root: Path, tmp_path: Path
) -> None:
    entries, other = sysext_images(tmp_path, sandbox_root)
    names = sorted(entries)  # systemd-sysext stacks in version order, the last on top
    image_files = [file_identity(p) for p in entries.values() if p.is_file()]
    on_disk = {p: entry_state(p) for p in entries.values()}
    base = usr_tree(sandbox_root)
    with shared_root(sandbox_root):
        try:
            listed = listed_extensions(sandbox_root)
            assert {n: Path(r["path"]) for n, r in listed.items()} == {**entries, "other": other}
            merge = sysext_ok(sandbox_root, "merge")
            assert merge.merged, merge.output
            using = "', '".join(names)
            assert f"Using extensions '{using}'." in merge.output, merge.output
            assert merged_extensions(sandbox_root) == names
            merged = usr_tree(sandbox_root)
            assert merged["share/common/tool"][1] == b"beta\n"  # the last in order wins
            assert merged["bin/delta-link"] == ("symlink", b"alpha", 0o777)
            assert merged["share/gamma/g"][1] == b"gamma\n"
            assert "bin/other" not in merged  # incompatible: systemd-sysext leaves it out
            assert merged["bin/base-tool"][1] == BASE_TOOL_BYTES
            assert len(loops_on_files(image_files)) == len(image_files)
            sysext_ok(sandbox_root, "unmerge")
            assert merged_extensions(sandbox_root) is None
            assert stacked_overlays(sandbox_root, "/usr") == []
            wait_for(lambda: loops_on_files(image_files) == [], timeout=120,
                     what="systemd-sysext's loop devices released after unmerge")  # fmt: skip

            daemon.update_config({"images": {"sysext_paths": True}})
            serve(daemon)
            for name, entry in entries.items():
                device = (await wait_listed(client, name, "available"))[2]
                assert device == str(entry), (name, device)
            assert (await wait_listed(client, "other", "incompatible"))[2] == str(other)
            result = daemon.request({"action": "switch", "personalities": names}, timeout=120)
            assert ok(result)["attached"] == names
            assert usr_tree(sandbox_root) == merged
            rows = loops_on_files(image_files)
            assert sorted(r["back-ino"] for r in rows) == sorted(ino for _, ino in image_files)
            assert all(r["ro"] in (True, 1, "1") for r in rows), rows
            refused = daemon.request({"action": "attach", "personality": "other"})
            assert (refused["_dir"], refused["code"]) == ("failed", "incompatible"), refused

            ok(daemon.request({"action": "switch", "personalities": []}, timeout=120))
            wait_for(lambda: loops_on_files(image_files) == [], timeout=120,
                     what="personalityd's loop devices released")  # fmt: skip
            assert stacked_overlays(sandbox_root, "/usr") == []
            assert usr_tree(sandbox_root) == base
            assert {p: entry_state(p) for p in entries.values()} == on_disk, "an entry changed"
        finally:
            daemon.stop()
    assert "Traceback" not in daemon.log_text()


def personalityctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`personalityctl ARGS` against the daemon's bus (DBUS_SYSTEM_BUS_ADDRESS from its env)."""
    env = {**os.environ, **daemon.env}
    return subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def usr_mounts(root: Path) -> list[tuple[str, str, str]]:
    target = str(root / "usr")
    return [m for m in mountinfo() if m[0] == target]


async def test_an_active_sysext_merge_is_named_and_survives_under_the_stack(
    serve: Serve, daemon: Daemon, client: MessageBus, image: Images, sandbox_root: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    hello = build_sysext(tmp_path, "hello", {"usr/bin/hello": "#!/bin/sh\necho hello\n"})
    hello_file = file_identity(install_sysext(hello, extension_dir(sandbox_root), "hello.raw"))
    install(image("web", {"usr/bin/web": "web\n"}), search_dir(sandbox_root), "web.raw")
    with shared_root(sandbox_root):
        try:
            assert sysext_ok(sandbox_root, "merge").merged
            assert merged_extensions(sandbox_root) == ["hello"]
            sysext_mount = usr_mounts(sandbox_root)
            assert [m[1:] for m in sysext_mount] == [("overlay", "sysext")]

            serve(daemon)
            lines = [line for line in daemon.log_text().splitlines() if SYSEXT_MERGED in line]
            assert len(lines) == 1, lines
            assert "hierarchies=/usr " in lines[0] and NOTICE_START in lines[0], lines[0]
            (notice,) = await get_property(client, "Notices")
            assert notice.startswith(NOTICE_START), notice
            status = personalityctl(daemon, "status")
            assert status.returncode == 0, status.stderr
            assert f"Notice: {notice}" in status.stdout, status.stdout

            # personalityd stacks over the merge: its base /usr is the merged one.
            ok(daemon.request({"action": "attach", "personality": "web"}))
            stacked = usr_mounts(sandbox_root)
            assert stacked[:-1] == sysext_mount and stacked[-1][1] == "overlay", stacked
            expect_both(sandbox_root)

            # systemd 252 does not recognize its merge under another overlay: `unmerge`
            # leaves it (and the stack) alone; `refresh` builds a new overlay over the
            # stack, which the kernel refuses (nesting depth: EINVAL), and unmerges nothing.
            unmerge = sysext(sandbox_root, "unmerge")
            assert "Unmerged" not in unmerge.output, unmerge.output
            refresh = sysext(sandbox_root, "refresh")
            print(f"systemd-sysext refresh over the stack: exit {refresh.returncode}\n"
                  f"{refresh.output}")  # fmt: skip
            assert not refresh.merged, refresh.output
            assert "Invalid argument" in refresh.output, refresh.output
            assert usr_mounts(sandbox_root) == stacked
            expect_both(sandbox_root)
            assert daemon.running()
            assert (await get_property(client, "Attached")) == ["web"]

            # Detached again: the merge shows as before, and systemd-sysext owns it again.
            ok(daemon.request({"action": "detach", "personality": "web"}))
            assert usr_mounts(sandbox_root) == sysext_mount
            assert read(sandbox_root, "usr/bin/hello") == b"#!/bin/sh\necho hello\n"
            assert not (sandbox_root / "usr/bin/web").exists()
            assert merged_extensions(sandbox_root) == ["hello"]
        finally:
            daemon.stop()
        # Stopped, the daemon leaves its read-only reference to the base /usr mounted (for
        # its next start); that reference is a bind of the merge, so the merge's loop device
        # stays until the tree is unmounted.
        assert "Unmerged" in sysext_ok(sandbox_root, "unmerge").output
        assert usr_mounts(sandbox_root) == []
        assert not (sandbox_root / "usr/bin/hello").exists()
    assert loops_on_files([hello_file]) == []
    assert "Traceback" not in daemon.log_text()


async def test_following_the_notice_moves_the_extensions_over(
    serve: Serve, daemon: Daemon, client: MessageBus, image: Images, sandbox_root: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The notice's advice on a live host: stop personalityd, `systemd-sysext unmerge`, set
    images.sysext_paths = true, start again; the extension comes back from personalityd, and
    nothing of the old merge stays under its stacks (its base reference is renewed)."""
    hello = build_sysext(tmp_path, "hello", {"usr/bin/hello": "#!/bin/sh\necho hello\n"})
    hello_file = file_identity(install_sysext(hello, extension_dir(sandbox_root), "hello.raw"))
    install(image("web", {"usr/bin/web": "web\n"}), search_dir(sandbox_root), "web.raw")
    with shared_root(sandbox_root):
        try:
            assert sysext_ok(sandbox_root, "merge").merged
            serve(daemon)
            assert len(await get_property(client, "Notices")) == 1
            daemon.stop()
            assert "Unmerged" in sysext_ok(sandbox_root, "unmerge").output
            daemon.update_config({"images": {"sysext_paths": True}})
            serve(daemon)
            assert await get_property(client, "Notices") == []
            assert daemon.log_text().count(SYSEXT_MERGED) == 1  # the first start only
            assert "event=base_reference_renewed hierarchy=/usr" in daemon.log_text()
            # The stale reference went, and the old merge with it: no loop device on hello.raw.
            wait_for(lambda: loops_on_files([hello_file]) == [], timeout=120,
                     what="the old merge's loop device released")  # fmt: skip

            ok(daemon.request({"action": "switch", "personalities": ["hello", "web"]}))
            expect_both(sandbox_root)
            assert len(loops_on_files([hello_file])) == 1
            ok(daemon.request({"action": "detach", "personality": "hello"}))
            assert not (sandbox_root / "usr/bin/hello").exists(), "the old merge came back"
            assert read(sandbox_root, "usr/bin/web") == b"web\n"
            ok(daemon.request({"action": "switch", "personalities": []}))
            wait_for(lambda: loops_on_files([hello_file]) == [], timeout=120,
                     what="personalityd's loop device released")  # fmt: skip
        finally:
            daemon.stop()
    assert "Traceback" not in daemon.log_text()


def expect_both(root: Path) -> None:
    """The stack shows personalityd's file, the merged extension's and the base's."""
    assert read(root, "usr/bin/web") == b"web\n"
    assert read(root, "usr/bin/hello") == b"#!/bin/sh\necho hello\n"
    assert read(root, "usr/bin/base-tool") == BASE_TOOL_BYTES
