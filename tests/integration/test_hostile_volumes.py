"""The hostile-volume corpus: volumes built to cross the trust boundary (docs/security.md).

Each case builds its volume here, as a real squashfs, erofs or ext4 image on a loop device,
and checks the outcome from outside, the way an attacker or an administrator would see it:
ListPersonalities over D-Bus, the refusal in the journal (`18d0afe9...`, with
`PERSONALITY_REASON`), the answer to an attach (also with `force`), files through the stacked
sandbox root read by uid 65534 with no groups (`setpriv`), and inotify watches that show which
files of a volume anybody opened. Where an attack needs a setting the administrator can change
(`nosuid`), a control case with that setting removed shows the attack really works here, so a
pass is not an accident of the test machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus
from served_daemon import listing

from testkit.contract import MESSAGE_ID_CONFLICT, MESSAGE_ID_VOLUME_REFUSED
from testkit.daemon import Daemon
from testkit.images import FileSpec, build_image, rewrite_in_place
from testkit.inotify import OpenWatch
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.mounts import mountinfo, remove_tree
from testkit.polling import wait_for
from testkit.sandbox import make_sandbox_root

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
SHADOW = "root:$6$SECRET-HASH-OF-THE-BASE$:19700:0:99999:7:::\n"
CAT = Path("/usr/bin/cat").read_bytes()
ID = Path("/usr/bin/id").read_bytes()
NO_NOSUID = {"volumes": {"mount_options": ["ro", "nodev"]}}
NO_NODEV = {"volumes": {"mount_options": ["ro", "nosuid"]}}

Serve = Callable[[Daemon], Daemon]


@pytest.fixture
def sandbox_root(loop_devices: LoopDevices) -> Iterator[Path]:
    """Replaces conftest's: the same base tree, but in a directory every user may traverse
    (pytest's own tmp dirs are 0700), so that uid 65534 can reach the stack and try the
    attacks. Everything mounted under it is unmounted before it is removed."""
    top = Path(tempfile.mkdtemp(prefix="personalityd-hostile-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield make_sandbox_root(top / "root")
    finally:
        remove_tree(top)


@pytest.fixture
def shadow(sandbox_root: Path) -> Path:
    """The sandbox base's /etc/shadow: root's, mode 0600, holding a hash nobody may read."""
    path = sandbox_root / "etc/shadow"
    path.write_text(SHADOW)
    path.chmod(0o600)
    return path


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `argv` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        [*NOBODY, *map(str, argv)], capture_output=True, text=True, timeout=60, check=False
    )


def refusal(journal: JournalReader, dev: str) -> dict[str, Any]:
    """The newest refusal entry journalled for `dev` (waits for one)."""
    entries = journal.entries(MESSAGE_ID_VOLUME_REFUSED, PERSONALITY_DEVICE=dev, timeout=120)
    assert entries, f"no refusal journalled for {dev}"
    return entries[-1]


async def expect_refused(
    daemon: Daemon,
    client: MessageBus,
    journal: JournalReader,
    dev: str,
    name: str,
    *needles: str,
) -> str:
    """`name` on `dev` is refused as the trust boundary says: journalled with a reason holding
    every needle, listed as incompatible, and not attachable, also not with force."""
    entry = refusal(journal, dev)
    reason = str(entry["PERSONALITY_REASON"])
    for needle in needles:
        assert needle in reason, reason
    assert entry.get("PERSONALITY_NAME") == name, entry
    rows = await listing(client)
    assert rows[name][0] == "incompatible", rows
    for force in (False, True):
        result = daemon.request({"action": "attach", "personality": name, "force": force})
        assert result["status"] == "error", result
        assert result["code"] == "incompatible", result
        assert needles[0] in result["message"], result
    return reason


def attach_ok(daemon: Daemon, name: str) -> dict[str, Any]:
    result = daemon.request({"action": "attach", "personality": name}, timeout=120)
    assert result["status"] == "ok", result
    return result


@pytest.fixture
def own_mount(sandbox_root: Path) -> Callable[[str, str], Path]:
    """`own_mount(dev, fstype)`: the test mounts the device itself, read-only, under the
    sandbox root (unmounted with it), to watch the volume's inodes with inotify."""

    def mount(dev: str, fstype: str) -> Path:
        point = sandbox_root / "watch" / Path(dev).name
        point.mkdir(parents=True)
        options = "ro,nodev,nosuid,noexec" + (",norecovery" if fstype == "ext4" else "")
        subprocess.run(["mount", "-t", fstype, "-o", options, dev, point], check=True)
        return point

    return mount


# --------------------------------------------------------------------------------------------
# No privilege through the stack: set-id files, file capabilities, device nodes


@pytest.mark.parametrize(
    ("fmt", "mode", "bit"),
    [
        ("squashfs", 0o4755, "set-user-ID"),
        ("erofs", 0o2755, "set-group-ID"),
        ("ext4", 0o6755, "set-user-ID, set-group-ID"),
    ],
)
async def test_set_id_file_is_refused(
    fmt: str,
    mode: int,
    bit: str,
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    files: dict[str, FileSpec] = {
        "usr/bin/fine": b"#!/bin/sh\n",
        "usr/libexec/x/suid-id": ("file", ID, mode),
    }
    dev = loop_devices.attach(build_image(tmp_path, "setid", files, fmt))
    serve(daemon)
    reason = await expect_refused(
        daemon, client, journal, dev, "setid", "/usr/libexec/x/suid-id", "set-id", bit
    )
    assert "nosuid" in reason
    assert not (sandbox_root / "usr/libexec/x/suid-id").exists()
    assert as_nobody(sandbox_root / "usr/libexec/x/suid-id", "-u").returncode != 0


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "ext4"])
async def test_file_capabilities_are_refused_so_nobody_cannot_read_the_shadow_file(
    fmt: str,
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    shadow: Path,
    journal: JournalReader,
) -> None:
    """Issue 9, item 1: `cat` with cap_dac_read_search=ep let uid 65534 read /etc/shadow."""
    image = build_image(
        tmp_path,
        "capcat",
        {"usr/bin/capcat": ("file", CAT, 0o755)},
        fmt,
        capabilities={"usr/bin/capcat": "cap_dac_read_search=ep"},
    )
    dev = loop_devices.attach(image)
    serve(daemon)
    await expect_refused(
        daemon, client, journal, dev, "capcat", "/usr/bin/capcat", "security.capability"
    )
    attack = as_nobody(sandbox_root / "usr/bin/capcat", shadow)
    assert attack.returncode != 0 and "SECRET" not in attack.stdout, attack
    assert "SECRET" not in as_nobody("cat", shadow).stdout  # and plain cat cannot either


async def test_file_capabilities_do_work_through_the_stack_once_nosuid_is_removed(
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    shadow: Path,
) -> None:
    """The control of the case above: the administrator's choice to drop nosuid is what lets
    the capability through; so the refusal is what stops the attack."""
    image = build_image(
        tmp_path,
        "capcat",
        {"usr/bin/capcat": ("file", CAT, 0o755)},
        capabilities={"usr/bin/capcat": "cap_dac_read_search=ep"},
    )
    loop_devices.attach(image)
    daemon.update_config(NO_NOSUID)
    serve(daemon)
    attach_ok(daemon, "capcat")
    attack = as_nobody(sandbox_root / "usr/bin/capcat", shadow)
    assert attack.returncode == 0 and attack.stdout == SHADOW, attack


@pytest.mark.parametrize(
    ("spec", "kind"),
    [(("chardev", 1, 3), "character device 1:3"), (("blockdev", 7, 0), "block device 7:0")],
)
@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
async def test_device_nodes_are_refused_under_nodev(
    fmt: str,
    spec: tuple[str, int, int],
    kind: str,
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    files: dict[str, FileSpec] = {"usr/share/dev/node": spec, "usr/share/dev/plain": "data\n"}
    dev = loop_devices.attach(build_image(tmp_path, "devnode", files, fmt))
    serve(daemon)
    reason = await expect_refused(
        daemon, client, journal, dev, "devnode", "/usr/share/dev/node", kind
    )
    assert "nodev" in reason
    assert not (sandbox_root / "usr/share/dev").exists()


async def test_whiteouts_are_not_device_nodes(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, sandbox_root: Path
) -> None:
    """A character device 0:0 is an overlay whiteout (how a personality deletes a base file):
    allowed under nodev, and honoured."""
    files: dict[str, FileSpec] = {"usr/bin/base-tool": ("chardev", 0, 0), "usr/bin/wo-tool": "x"}
    loop_devices.attach(build_image(tmp_path, "whiteout", files))
    daemon.start()
    attach_ok(daemon, "whiteout")
    assert (sandbox_root / "usr/bin/wo-tool").read_text() == "x"
    assert not os.path.lexists(sandbox_root / "usr/bin/base-tool")


# --------------------------------------------------------------------------------------------
# No volume file is opened unless it is a regular file: FIFOs, sockets, devices, symlinks


async def test_fifos_sockets_and_devices_are_data_never_opened(
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    own_mount: Callable[[str, str], Path],
) -> None:
    """Without nodev, device nodes are data like FIFOs and sockets: stacked, never opened by
    the daemon (the index and the conflict check only lstat them), never usable through the
    stack (the overlay is nodev). Another volume provides the same paths, so the conflict
    check looks at every one of them."""
    special: dict[str, FileSpec] = {
        "usr/share/odd/null": ("chardev", 1, 3),
        "usr/share/odd/loop": ("blockdev", 7, 0),
        "usr/share/odd/fifo": ("fifo",),
        "usr/share/odd/sock": ("socket",),
        "usr/share/odd/same": "same bytes\n",
    }
    dev = loop_devices.attach(build_image(tmp_path, "odd", special))
    plain: dict[str, FileSpec] = {rel: f"plain {rel}\n" for rel in special}
    plain["usr/share/odd/same"] = "same bytes\n"
    loop_devices.attach(build_image(tmp_path, "plain", plain))
    watched = own_mount(dev, "squashfs") / "usr/share/odd"
    daemon.update_config(NO_NODEV)
    with OpenWatch([watched]) as watch:
        serve(daemon)
        result = daemon.request({"action": "switch", "personalities": ["plain", "odd"]})
        assert result["status"] == "ok", result
        rows = await listing(client)
        assert rows["odd"][0] == "attached", rows
        report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
        opened = {name for _, name in watch.opened()}
    conflicts = {c["path"]: c for c in report["conflicts"]}
    assert set(conflicts) == {f"/{rel}" for rel in special}, conflicts
    assert conflicts["/usr/share/odd/same"]["identical"] is True
    assert opened <= {"same"}, f"the daemon opened {opened} in the volume"
    odd = sandbox_root / "usr/share/odd"
    assert (odd / "null").is_char_device() and (odd / "fifo").is_fifo()
    assert (odd / "sock").is_socket() and (odd / "loop").is_block_device()
    for node in ("null", "loop"):
        with pytest.raises(PermissionError):
            os.open(odd / node, os.O_RDONLY | os.O_NONBLOCK)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [(("fifo",), "a FIFO"), (("chardev", 1, 5), "a character device"), (("dir",), "a directory")],
)
def test_a_manifest_that_is_not_a_regular_file_is_never_opened(
    spec: tuple[Any, ...],
    kind: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
    own_mount: Callable[[str, str], Path],
) -> None:
    """Issue 9, item 8: with nodev removed, the daemon opened a device node named as the
    manifest. It must look first (lstat), and open nothing but a regular file."""
    files: dict[str, FileSpec] = {
        "usr/lib/extension-release.d/extension-release.node": spec,
        "usr/bin/n": "n",
    }
    image = build_image(tmp_path, "node", files, with_manifest=False)
    dev = loop_devices.attach(image)
    watched = own_mount(dev, "squashfs") / "usr/lib/extension-release.d"
    daemon.update_config(NO_NODEV)
    with OpenWatch([watched]) as watch:
        daemon.start()
        entry = refusal(journal, dev)
        opened = watch.opened()
    assert f"extension-release.node is not a regular file (it is {kind})" in str(
        entry["PERSONALITY_REASON"]
    ), entry
    assert opened == [], f"the daemon opened {opened}"
    result = daemon.request({"action": "attach", "personality": "node"})
    assert result["code"] == "no-such-personality", result


def test_a_manifest_symlink_out_of_the_volume_is_not_followed(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    host = tmp_path / "host-release.d"
    host.mkdir()
    (host / "extension-release.lnk").write_text('ID=_any\nPERSONALITY_DESCRIPTION="host"\n')
    files: dict[str, FileSpec] = {
        "usr/lib/extension-release.d/extension-release.lnk": (
            "symlink",
            str(host / "extension-release.lnk"),
        ),
        "usr/bin/lnk": "lnk",
    }
    dev = loop_devices.attach(build_image(tmp_path, "lnk", files, with_manifest=False))
    with OpenWatch([host]) as watch:
        daemon.start()
        entry = refusal(journal, dev)
        opened = watch.opened()
    assert "is not a regular file (it is a symlink)" in str(entry["PERSONALITY_REASON"]), entry
    assert opened == [], f"the daemon opened {opened} outside the volume"


async def test_symlinks_pointing_outside_are_data_the_daemon_never_follows(
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    shadow: Path,
) -> None:
    """`usr/bin/x -> /etc/shadow`: allowed (a symlink is data, resolved by whoever reads it,
    with their own rights); the daemon neither opens the target nor reports its content."""
    links: dict[str, FileSpec] = {
        "usr/bin/shadow-abs": ("symlink", str(shadow)),
        "usr/bin/shadow-rel": ("symlink", "../../../../../../../../../../" + str(shadow)),
        "usr/bin/clash": ("symlink", str(shadow)),
    }
    loop_devices.attach(build_image(tmp_path, "links", links))
    loop_devices.attach(build_image(tmp_path, "plain", {"usr/bin/clash": SHADOW}))
    with OpenWatch([shadow.parent]) as watch:
        serve(daemon)
        result = daemon.request({"action": "switch", "personalities": ["plain", "links"]})
        assert result["status"] == "ok", result
        opened = [name for _, name in watch.opened() if name == "shadow"]
    assert opened == [], "the daemon opened the base's shadow file through a volume's link"
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    clash = next(c for c in report["conflicts"] if c["path"] == "/usr/bin/clash")
    assert clash["identical"] is False  # a symlink and a file are never compared by content
    assert os.readlink(sandbox_root / "usr/bin/shadow-abs") == str(shadow)
    for link in ("shadow-abs", "shadow-rel"):
        attack = as_nobody("cat", sandbox_root / "usr/bin" / link)
        assert attack.returncode != 0 and "SECRET" not in attack.stdout, attack
    assert "SECRET" not in daemon.log_text()


# --------------------------------------------------------------------------------------------
# Overlay metadata in a volume is data, not instructions


@pytest.fixture
def private_base_dir(sandbox_root: Path) -> Path:
    """A 0700 directory of the base, /usr/lib/private, with a world-readable file inside: only
    root can reach the file, because of the directory."""
    private = sandbox_root / "usr/lib/private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    (private / "secret.txt").write_text("SECRET of the base\n")
    (private / "secret.txt").chmod(0o644)
    assert as_nobody("cat", private / "secret.txt").returncode != 0
    return private


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_a_redirect_in_a_volume_does_not_reach_a_private_base_directory(
    namespace: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    private_base_dir: Path,
) -> None:
    """Issue 9, item 5: a volume directory redirected to a 0700 base directory let uid 65534
    read a file from it. Overlays must not follow a lower layer's redirect."""
    files: dict[str, FileSpec] = {
        "usr/share/pub": ("dir", 0o755),
        "usr/share/pub/readme": "public\n",
    }
    image = build_image(
        tmp_path,
        "redirect",
        files,
        xattrs={"usr/share/pub": {f"{namespace}.overlay.redirect": b"/lib/private"}},
    )
    loop_devices.attach(image)
    daemon.start()
    attach_ok(daemon, "redirect")
    attack = as_nobody("cat", sandbox_root / "usr/share/pub/secret.txt")
    assert "SECRET" not in attack.stdout, attack
    as_root = subprocess.run(
        ["cat", sandbox_root / "usr/share/pub/secret.txt"], capture_output=True, text=True
    )
    assert "SECRET" not in as_root.stdout, "the redirect was followed"


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_a_metacopy_file_in_a_volume_does_not_show_base_data(
    namespace: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    private_base_dir: Path,
) -> None:
    """A metacopy file claims its data lives elsewhere (its redirect): with metacopy off the
    claim is never followed, so uid 65534 gets at most the volume's own (empty) file."""
    image = build_image(
        tmp_path,
        "metacopy",
        {"usr/share/meta.txt": ("file", b"", 0o644)},
        xattrs={
            "usr/share/meta.txt": {
                f"{namespace}.overlay.metacopy": b"",
                f"{namespace}.overlay.redirect": b"/lib/private/secret.txt",
            }
        },
    )
    loop_devices.attach(image)
    daemon.start()
    attach_ok(daemon, "metacopy")
    attack = as_nobody("cat", sandbox_root / "usr/share/meta.txt")
    assert "SECRET" not in attack.stdout, attack


def test_user_overlay_attributes_are_plain_data(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, sandbox_root: Path
) -> None:
    """The overlays use the trusted.overlay.* namespace: a volume's user.overlay.opaque or
    user.overlay.whiteout is an ordinary attribute, hides nothing, and is reported as nothing."""
    doc = sandbox_root / "usr/share/doc/base-doc"
    doc.write_text("base doc\n")
    image = build_image(
        tmp_path,
        "uxattr",
        {"usr/share/doc/mine": "mine\n", "usr/share/doc/wo": ("file", b"", 0o644)},
        xattrs={
            "usr/share/doc": {"user.overlay.opaque": b"y"},
            "usr/share/doc/wo": {"user.overlay.whiteout": b""},
        },
    )
    loop_devices.attach(image)
    daemon.start()
    attach_ok(daemon, "uxattr")
    assert doc.read_text() == "base doc\n"
    assert (sandbox_root / "usr/share/doc/mine").read_text() == "mine\n"
    assert (sandbox_root / "usr/share/doc/wo").read_bytes() == b""
    assert os.getxattr(sandbox_root / "usr/share/doc", "user.overlay.opaque") == b"y"
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert report["masks"] == [], "a user.overlay attribute reported as hiding base content"


# --------------------------------------------------------------------------------------------
# Names: traversal, odd bytes, duplicates


def test_a_manifest_named_dot_dot_is_refused(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path, journal: JournalReader
) -> None:
    files: dict[str, FileSpec] = {
        "usr/lib/extension-release.d/extension-release...": "ID=_any\n",
        "usr/bin/dd": "x",
    }
    dev = loop_devices.attach(build_image(tmp_path, "dots", files, with_manifest=False))
    daemon.start()
    assert refusal(journal, dev)
    result = daemon.request({"action": "attach", "personality": ".."})
    assert result["code"] == "invalid-name", result
    assert not any(src == dev for _, _, src in mountinfo())


def test_odd_entry_names_are_stacked_and_reported_as_they_are(
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    """Names with a newline, a backslash, `..` in them, a leading dash and bytes that are not
    UTF-8: files like any other, found as conflicts, reported without breaking the journal or
    conflicts.json, and read back through the stack from the winner."""
    odd = [
        "usr/share/odd/..\n..",
        "usr/share/odd/-rf",
        "usr/share/odd/back\\slash",
        "usr/share/odd/" + os.fsdecode(b"\xff\xfe-latin1-\xe9"),
        "usr/share/odd/" + "x" * 255,
    ]
    for name in ("low", "high"):
        loop_devices.attach(build_image(tmp_path, name, {rel: f"{name}\n" for rel in odd}))
    daemon.start()
    result = daemon.request({"action": "switch", "personalities": ["low", "high"]})
    assert result["status"] == "ok", result
    for rel in odd:
        assert (sandbox_root / rel).read_text() == "high\n", rel
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert len(report["conflicts"]) == len(odd), report
    assert all(c["winner"] == "high" for c in report["conflicts"])
    entries = journal.entries(
        MESSAGE_ID_CONFLICT,
        min_count=len(odd),
        PERSONALITY_GENERATION=str(result["generation"]),
        _PID=str(daemon.pid),
        timeout=60,
    )
    assert len(entries) == len(odd), entries
    assert daemon.running()


@pytest.mark.parametrize(
    ("manifests", "why"),
    [
        (("usr/lib/extension-release.d/extension-release.a",
          "usr/lib/extension-release.d/extension-release.b"), "more than one manifest"),
        (("usr/lib/extension-release.d/extension-release.a",
          "etc/extension-release.d/extension-release.a"), "more than one manifest"),
    ],
)  # fmt: skip
def test_two_manifests_in_one_volume_are_refused(
    manifests: tuple[str, ...],
    why: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    journal: JournalReader,
) -> None:
    files: dict[str, FileSpec] = {m: "ID=_any\n" for m in manifests}
    files["usr/bin/two"] = "2"
    dev = loop_devices.attach(build_image(tmp_path, "two", files, with_manifest=False))
    daemon.start()
    assert why in str(refusal(journal, dev)["PERSONALITY_REASON"])
    assert daemon.request({"action": "attach", "personality": "a"})["status"] == "error"
    assert not any(src == dev for _, _, src in mountinfo())


def test_a_second_volume_with_the_same_name_is_refused(
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    first = loop_devices.attach(build_image(tmp_path, "twin", {"usr/bin/twin": "first\n"}))
    daemon.start()
    second = loop_devices.attach(build_image(tmp_path, "twin", {"usr/bin/twin": "second\n"}))
    reason = str(refusal(journal, second)["PERSONALITY_REASON"])
    assert f"already used by {first}" in reason, reason
    attach_ok(daemon, "twin")
    assert (sandbox_root / "usr/bin/twin").read_text() == "first\n"


# --------------------------------------------------------------------------------------------
# Layers are what was checked: symlinked hierarchies, content rewritten in place


@pytest.fixture
def nobody_dir(tmp_path: Path) -> Path:
    """A directory uid 65534 owns, with a `bin/tool` in it: whatever it holds is theirs."""
    evil = tmp_path / "evil"
    (evil / "bin").mkdir(parents=True)
    (evil / "bin/tool").write_text("#!/bin/sh\necho from a directory nobody controls\n")
    for path in (evil, evil / "bin", evil / "bin/tool"):
        os.chown(path, 65534, 65534)
    return evil


@pytest.mark.parametrize(
    ("link", "hierarchies", "shown"),
    [("usr", None, "/usr"), ("opt", ["/usr", "/etc", "/opt/app"], "/opt")],
)
async def test_a_symlinked_hierarchy_is_refused(
    link: str,
    hierarchies: list[str] | None,
    shown: str,
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
    nobody_dir: Path,
) -> None:
    files: dict[str, FileSpec] = {link: ("symlink", str(nobody_dir)), "etc/symlinked.conf": "x\n"}
    image = build_image(tmp_path, "symlinked", files, manifest_dir="etc/extension-release.d")
    dev = loop_devices.attach(image)
    if hierarchies is not None:
        (sandbox_root / "opt/app").mkdir(parents=True)
        daemon.update_config({"stack": {"hierarchies": hierarchies}})
    serve(daemon)
    await expect_refused(daemon, client, journal, dev, "symlinked", f"its {shown} is a symlink")
    assert not (sandbox_root / "etc/symlinked.conf").exists()
    assert not (sandbox_root / "usr/bin/tool").exists()


def _released(dev: str) -> bool:
    """No mount holds the device any more (it accepts an exclusive open), so the next mount
    reads it afresh."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def _wait_released(client: MessageBus, name: str, timeout: float = 120) -> None:
    """Until the daemon lists `name` as available: its device released (no longer draining)."""
    deadline = time.monotonic() + timeout
    while (await listing(client))[name][0] != "available":
        assert time.monotonic() < deadline, await listing(client)
        await asyncio.sleep(0.1)


def _padded_image(tmp_path: Path, name: str, files: dict[str, FileSpec]) -> Path:
    """A squashfs image with 1 MiB of incompressible padding, so a smaller one fits in it."""
    return build_image(tmp_path, name, {**files, "usr/share/pad/random": os.urandom(1 << 20)})


async def test_an_image_rewritten_in_place_is_probed_again_before_it_is_stacked(
    daemon: Daemon,
    serve: Serve,
    client: MessageBus,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
    nobody_dir: Path,
) -> None:
    """Issue 9, item 3: the image behind a loop device was rewritten with `usr` a symlink to a
    directory uid 65534 owns, and the next attach stacked it with the old probe and index, so
    the /usr overlay came from that directory. Now the attach probes it again and refuses it."""
    image = _padded_image(tmp_path, "inplace", {"usr/bin/tool": "#!/bin/sh\necho v1\n"})
    dev = loop_devices.attach(image)
    serve(daemon)
    attach_ok(daemon, "inplace")
    assert (sandbox_root / "usr/bin/tool").read_text() == "#!/bin/sh\necho v1\n"
    detached = daemon.request({"action": "detach", "personality": "inplace"})
    assert detached["status"] == "ok", detached
    await _wait_released(client, "inplace")
    evil = build_image(
        tmp_path,
        "inplace",
        {"usr": ("symlink", str(nobody_dir)), "etc/inplace.conf": "v2\n"},
        manifest_dir="etc/extension-release.d",
    )
    rewrite_in_place(image, evil)

    result = daemon.request({"action": "attach", "personality": "inplace"}, timeout=120)

    assert result["status"] == "error" and result["code"] == "incompatible", result
    assert "its /usr is a symlink" in result["message"], result
    entry = refusal(journal, dev)
    assert "its /usr is a symlink" in str(entry["PERSONALITY_REASON"]), entry
    rows = await listing(client)
    assert rows["inplace"][0] == "incompatible", rows
    # What uid 65534 puts in its directory does not appear in /usr: /usr is not built from it.
    (nobody_dir / "bin/planted").write_text("planted\n")
    assert not (sandbox_root / "usr/bin/planted").exists()
    assert not (sandbox_root / "usr/bin/tool").exists()
    assert not (sandbox_root / "etc/inplace.conf").exists()
    assert (sandbox_root / "usr/bin/base-tool").exists()


def test_an_image_rewritten_in_place_with_new_content_is_indexed_again(
    daemon: Daemon,
    loop_devices: LoopDevices,
    tmp_path: Path,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    """A benign update in place: the next stack shows the new files and their conflicts (the
    old index would miss both)."""
    loop_devices.attach(build_image(tmp_path, "keep", {"usr/bin/keep": "keep\n"}))
    image = _padded_image(tmp_path, "upd", {"usr/bin/upd": "v1\n"})
    dev = loop_devices.attach(image)
    daemon.start()
    result = daemon.request({"action": "switch", "personalities": ["keep", "upd"]})
    assert result["status"] == "ok", result
    assert daemon.request({"action": "detach", "personality": "upd"})["status"] == "ok"
    wait_for(lambda: _released(dev), 120, "the volume to be released")
    v2 = build_image(tmp_path, "upd", {"usr/bin/upd": "v2\n", "usr/bin/keep": "upd's keep\n"})
    rewrite_in_place(image, v2)

    result = daemon.request({"action": "attach", "personality": "upd"}, timeout=120)

    assert result["status"] == "ok", result
    assert (sandbox_root / "usr/bin/upd").read_text() == "v2\n"
    assert (sandbox_root / "usr/bin/keep").read_text() == "upd's keep\n"
    entries = journal.entries(
        MESSAGE_ID_CONFLICT,
        PERSONALITY_PATH="/usr/bin/keep",
        PERSONALITY_GENERATION=str(result["generation"]),
        _PID=str(daemon.pid),
        timeout=60,
    )
    assert entries and entries[-1]["PERSONALITY_WINNER"] == "upd", entries


@pytest.fixture(autouse=True)
def _drop_image_trees(tmp_path: Path) -> Iterator[None]:
    yield
    for tree in (tmp_path / "images").glob("*.tree"):
        shutil.rmtree(tree, ignore_errors=True)
