"""The stack's mounts as a trust boundary (docs/architecture.md, "The stack's mounts"):

- overlay metadata in a volume is data: a lower layer's `trusted.overlay.redirect` and
  `metacopy` attributes are never followed;
- the base stays untouchable: the daemon's references to it are read-only mounts, so
  `rm -rf` of the runtime directory, or any write through them, changes nothing;
- the hierarchy keeps its own face: the stacked `/usr` has the base's mode, owner and group,
  whatever the volume's `usr/` says;
- mounts below a hierarchy stay reachable at their paths through every change and after the
  last detach.

Each attack is made from outside: images with hostile attributes attached as loop devices,
files read through the sandbox root by uid 65534 without groups, mountinfo, the daemon's log.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sandbox_view import Images, ok, read

from testkit.daemon import Daemon
from testkit.images import FileSpec, format_os_release, pack_image, write_tree
from testkit.loops import LoopDevices
from testkit.mounts import is_mount_point, mountinfo
from testkit.nobody import run_as_nobody
from testkit.processes import run
from testkit.sandbox import BASE_TOOL_BYTES, OS_RELEASE

SECRET = b"secret of the base, for root only\n"
REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"
LABEL = "security.selinux"

# The overlay API and swap paths the submount tests run (config `stack.*`).
PATHS = {
    "lowerdir+/beneath": {"overlay_api": "lowerdir+", "swap": "beneath"},
    "legacy/beneath": {"overlay_api": "legacy", "swap": "beneath"},
    "lowerdir+/replace": {"overlay_api": "lowerdir+", "swap": "replace"},
}


def xattr_image(
    tmp_path: Path,
    name: str,
    files: Mapping[str, FileSpec],
    xattrs: Mapping[str, Mapping[str, bytes]],
    fmt: str = "squashfs",
    label: str | None = None,
    modes: Mapping[str, int] | None = None,
) -> Path:
    """A personality image whose tree has extended attributes and directory modes set
    before packing (root-relative path -> {attribute: value} / mode)."""
    images = tmp_path / "hostile-images"
    src = images / f"{name}.tree"
    write_tree(src, files)
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text(format_os_release({"ID": "_any"}))
    for rel, attrs in xattrs.items():
        for key, value in attrs.items():
            os.setxattr(src / rel, key, value, follow_symlinks=False)
    for rel, mode in (modes or {}).items():
        os.chmod(src / rel, mode)
    image = images / f"{name}.{fmt}"
    pack_image(src, image, fmt, label)
    return image


def secret_in_base(root: Path) -> None:
    """usr/secret (0700, root) holding key (0644): only root may reach the key."""
    secret = root / "usr/secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_bytes(SECRET)
    os.chmod(secret / "key", 0o644)
    os.chmod(secret, 0o700)


def as_nobody(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_as_nobody(root, *argv)


# -- overlay metadata in a volume is data ------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "api"),
    [
        ("squashfs", "lowerdir+"),
        ("ext4", "lowerdir+"),
        ("erofs", "lowerdir+"),
        ("squashfs", "legacy"),
    ],
)
def test_lower_layer_redirects_and_metacopy_are_not_followed(
    fmt: str,
    api: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    """A volume directory redirected to a 0700 base directory, and a metacopy file
    redirected to a file in it: uid 65534 reads neither the base's secret through them."""
    secret_in_base(sandbox_root)
    assert as_nobody(sandbox_root, "cat", "usr/secret/key").returncode != 0
    files: dict[str, FileSpec] = {
        "usr/share/peek/README": "the volume's own file\n",
        "usr/bin/peek": ("file", b"", 0o755),
    }
    xattrs = {
        "usr/share/peek": {REDIRECT: b"/secret"},
        "usr/bin/peek": {METACOPY: b"", REDIRECT: b"/secret/key"},
    }
    label = "personality-rd" if fmt == "ext4" else None
    loop_devices.attach(xattr_image(tmp_path, "redir", files, xattrs, fmt, label))
    daemon.update_config({"stack": {"overlay_api": api}})
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "redir"}))

    volume = sandbox_root / "opt/personality/redir"
    assert os.getxattr(volume / "usr/share/peek", REDIRECT) == b"/secret", "test is void"
    assert os.getxattr(volume / "usr/bin/peek", METACOPY) == b"", "test is void"
    # Not followed: overlayfs refuses the redirected directory (EPERM) rather than merge the
    # base's 0700 directory into it.
    listing = as_nobody(sandbox_root, "ls", "usr/share/peek")
    assert "key" not in listing.stdout.split(), "the redirect was followed into the base"
    for path in ("usr/share/peek/key", "usr/bin/peek"):
        got = as_nobody(sandbox_root, "cat", path)
        assert SECRET.decode() not in got.stdout, f"uid 65534 read the secret through {path}"
    for path in ("usr/share/peek/key", "usr/bin/peek"):  # not even root reads it there
        try:
            as_root = (sandbox_root / path).read_bytes()
        except OSError as exc:  # overlayfs refuses to follow: ENOENT or EPERM
            assert exc.errno in (errno.ENOENT, errno.EPERM), exc
            as_root = b""
        assert as_root != SECRET, path
    assert "redirect_dir=nofollow" in _super_options(sandbox_root / "usr")


def _super_options(path: Path) -> list[str]:
    """The superblock options of the top mount at `path` (the last field of mountinfo)."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                found = right.split()[2].split(",")
    return found


# -- the base stays untouchable ----------------------------------------------------------------


def tree_digest(top: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below `top`: type, mode, owner, size, and content hash or link target."""
    digest: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(top))
            content: str = ""
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            digest[rel] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, content)
    return digest


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _assert_provably_sandbox(
    runtime: Path, sandbox_root: Path, bases: set[tuple[int, int]]
) -> None:
    """Refuse to go on unless `rm -rf runtime` can reach nothing but the sandbox: we are in
    the test's private mount namespace, runtime is inside the sandbox, and every mount in it
    is either a bind of a sandbox hierarchy or a filesystem of its own (no host directory)."""
    assert os.environ.get("PERSONALITYD_TEST_NS") == "1"
    ours = os.readlink("/proc/self/ns/mnt")
    outside = []
    for pid in (1, os.getppid()):  # PID 1 may be out of reach; the session's parent is not
        try:
            outside.append(os.readlink(f"/proc/{pid}/ns/mnt"))
        except OSError:
            continue
    assert outside and ours not in outside, "not in a private mount namespace"
    assert runtime.resolve().is_relative_to(sandbox_root.resolve())
    assert sandbox_root.resolve().is_relative_to(Path("/tmp").resolve())
    host = {_identity(Path(p)) for p in ("/", "/etc", "/usr", "/var", "/tmp") if Path(p).exists()}
    host_devices = {dev for dev, _ in host}
    for point, _, _ in mountinfo():
        if point == str(runtime) or point.startswith(str(runtime) + "/"):
            here = _identity(Path(point))
            assert here not in host, f"{point} is a host directory"
            assert here in bases or here[0] not in host_devices, f"{point}: not provably ours"


WRITES = ("create", "truncate", "unlink", "mkdir", "chmod", "utime")


def write_through(ref: Path, what: str) -> None:
    """One kind of write through a base reference (`_usr` or `_etc`) to a base file."""
    existing = ref / ("bin/base-tool" if ref.name == "_usr" else "motd")
    if what == "create":
        (ref / "new-file").write_bytes(b"x")
    elif what == "truncate":
        with open(existing, "wb"):
            pass
    elif what == "unlink":
        existing.unlink()
    elif what == "mkdir":
        (ref / "new-dir").mkdir()
    elif what == "chmod":
        ref.chmod(0o777)
    else:
        os.utime(existing, (0, 0))


def test_rm_rf_of_the_runtime_dir_and_writes_through_base_references_change_nothing(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path, tmp_path: Path
) -> None:
    """The cleanup that once emptied a machine's /etc: `rm -rf --one-file-system` of the
    runtime directory (which does not stop at a bind mount of the same filesystem) on a live
    stack. It fails with EROFS, and the base is unchanged, file by file."""
    loop_devices.attach(image("web", {"usr/bin/web": "web\n", "etc/web.conf": "x"}))
    hierarchies = [sandbox_root / "usr", sandbox_root / "etc"]
    bases = {_identity(h) for h in hierarchies}
    before = {str(h): tree_digest(h) for h in hierarchies}
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "web"}))
    runtime = daemon.runtime_dir
    refs = [runtime / "base/_usr", runtime / "base/_etc"]
    assert {_identity(r) for r in refs} == bases
    _assert_provably_sandbox(runtime, sandbox_root, bases)

    proc = subprocess.run(
        ["rm", "-rf", "--one-file-system", str(runtime)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr, proc.stderr

    for ref in refs:
        for what in WRITES:
            with pytest.raises(OSError) as exc:
                write_through(ref, what)
            assert exc.value.errno == errno.EROFS, f"{what} through {ref}: {exc.value}"

    daemon.stop()
    for h in hierarchies:  # the stack is left mounted; look at the base beneath it
        run("umount", "--lazy", str(h))
    assert {str(h): tree_digest(h) for h in hierarchies} == before
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES


def test_a_writable_base_reference_left_by_an_earlier_run_is_made_read_only(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("web", {"usr/bin/web": "web\n"}))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "web"}))
    daemon.stop()
    ref = daemon.runtime_dir / "base/_usr"
    run("mount", "-o", "remount,bind,rw", str(ref))  # as an older version left it
    (ref / "probe-write").write_bytes(b"x")
    os.unlink(ref / "probe-write")

    daemon.start()

    with pytest.raises(OSError) as exc:
        (ref / "probe-write").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    assert read(sandbox_root, "usr/bin/web") == b"web\n"


# -- the hierarchy keeps its own face ----------------------------------------------------------


@pytest.mark.parametrize("writable", ["none", "tmpfs"])
def test_a_volume_with_0700_directories_keeps_the_base_mode_of_usr_and_etc(
    writable: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    """A volume built with umask 077 (usr/ and etc/ at 0700). The stacked /usr and /etc keep
    the base's mode, owner, group and label; uid 65534 still runs and reads base files."""
    usr, etc = sandbox_root / "usr", sandbox_root / "etc"
    os.chown(usr, 0, 100)
    os.chmod(usr, 0o751)  # not what any default would give
    os.setxattr(usr, LABEL, b"system_u:object_r:usr_t:s0")
    os.utime(usr, (1_000_000_000, 1_000_000_000))
    files: dict[str, FileSpec] = {"usr/share/tight/file": "t", "etc/tight.conf": "t"}
    modes = {"usr": 0o700, "usr/share/tight": 0o700, "etc": 0o700}
    loop_devices.attach(xattr_image(tmp_path, "tight", files, {}, modes=modes))
    faces = {h: _face(h) for h in (usr, etc)}
    daemon.update_config({"writable": {"fallback": writable}})
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "tight"}))

    volume = sandbox_root / "opt/personality/tight"
    assert stat.S_IMODE((volume / "usr").stat().st_mode) == 0o700, "test is void"
    assert {h: _face(h) for h in (usr, etc)} == faces
    if writable == "none":  # the metadata layer has the base's times too
        assert usr.stat().st_mtime == 1_000_000_000
    tool = as_nobody(sandbox_root, "usr/bin/base-tool")
    assert (tool.returncode, tool.stdout) == (0, "base-tool from the base\n"), tool.stderr
    release = as_nobody(sandbox_root, "cat", "usr/lib/os-release", "etc/motd")
    assert release.returncode == 0 and release.stdout.startswith(OS_RELEASE), release.stderr
    # Below the top, overlayfs semantics: the volume's own 0700 directory stays 0700.
    assert stat.S_IMODE((usr / "share/tight").stat().st_mode) == 0o700

    ok(daemon.request({"action": "detach", "personality": "tight"}))
    assert {h: _face(h) for h in (usr, etc)} == faces


def _face(path: Path) -> tuple[int, int, int, bytes | None]:
    st = path.stat()
    try:
        label: bytes | None = os.getxattr(path, LABEL)
    except OSError:
        label = None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, label


# -- mounts below a hierarchy stay -------------------------------------------------------------


class Submounts:
    """Mounts below the sandbox's hierarchies as a container runtime and an admin make them:
    a bind mount on etc/resolv.conf, tmpfs on usr/local and on usr/share/x; and later ones
    made on the stacked view. `check()` reads each back through the sandbox root."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.root = root
        self.content: dict[str, bytes] = {}  # mount point (root-relative) -> a file's content
        resolv = tmp_path / "resolv.conf"
        resolv.write_bytes(b"nameserver 192.0.2.53\n")
        (root / "etc/resolv.conf").write_bytes(b"# the base's own resolv.conf\n")
        run("mount", "--bind", str(resolv), str(root / "etc/resolv.conf"))
        self.content["etc/resolv.conf"] = resolv.read_bytes()
        self.tmpfs("usr/local", b"local tool\n")
        self.tmpfs("usr/share/x", b"deep below /usr/share\n")

    def tmpfs(self, rel: str, content: bytes) -> None:
        point = self.root / rel
        point.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "personalityd-test", str(point))
        (point / "file").write_bytes(content)
        self.content[rel] = content

    def check(self, when: str) -> None:
        for rel, content in self.content.items():
            point = self.root / rel
            assert is_mount_point(point), f"{when}: nothing mounted at {rel}"
            got = point.read_bytes() if rel.endswith(".conf") else (point / "file").read_bytes()
            assert got == content, f"{when}: {rel} shows {got!r}"

    def count(self, rel: str) -> int:
        return sum(1 for point, _, _ in mountinfo() if point == str(self.root / rel))


@pytest.mark.parametrize("path", list(PATHS))
def test_mounts_below_a_hierarchy_stay_through_every_change_and_after_the_last_detach(
    path: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    subs = Submounts(sandbox_root, tmp_path)
    before = {rel: subs.count(rel) for rel in subs.content}
    loop_devices.attach(image("one", {"usr/bin/one": "1", "etc/one.conf": "1"}))
    loop_devices.attach(image("two", {"usr/bin/two": "2", "etc/two.conf": "2"}))
    loop_devices.attach(image("three", {"usr/bin/three": "3"}))
    daemon.update_config({"stack": PATHS[path]})
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "one"}))
    subs.check("after attach")
    assert read(sandbox_root, "usr/bin/one") == b"1"
    subs.tmpfs("usr/share/doc", b"mounted on the stacked view\n")
    (sandbox_root / "usr/local/written-while-stacked").write_bytes(b"w\n")

    ok(daemon.request({"action": "switch", "personalities": ["two"]}))
    subs.check("after switch")
    assert (sandbox_root / "usr/local/written-while-stacked").read_bytes() == b"w\n"
    ok(daemon.request({"action": "attach", "personality": "three"}))
    subs.check("after attaching another")
    assert read(sandbox_root, "usr/bin/three") == b"3"

    daemon.restart()
    subs.check("after a restart")
    ok(daemon.request({"action": "switch", "personalities": ["three"]}))  # last of /etc
    subs.check("after /etc's last detach")
    assert not (sandbox_root / "etc/two.conf").exists()
    ok(daemon.request({"action": "detach", "personality": "three"}))  # last of /usr
    subs.check("after the last detach")
    assert not any(m[1] == "overlay" and m[0].startswith(str(sandbox_root)) for m in mountinfo())
    assert (sandbox_root / "usr/local/written-while-stacked").read_bytes() == b"w\n"
    # Nothing piles up: each path has as many mounts as before the first attach.
    assert {rel: subs.count(rel) for rel in before} == before
    assert subs.count("usr/share/doc") == 1

    ok(daemon.request({"action": "attach", "personality": "one"}))
    subs.check("after attaching again")


@pytest.mark.parametrize("path", list(PATHS))
def test_mounts_below_a_hierarchy_stay_with_an_upper_stacked_from_the_start(
    path: str,
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    """With an upper (the tmpfs fallback) the hierarchies are stacked before anything is
    attached and stay stacked after the last detach: the mounts below them (a container's
    bind mount on etc/resolv.conf, tmpfs on usr/local) stay visible through every change,
    one clone on the stack each, and writes beside them land in the upper."""
    subs = Submounts(sandbox_root, tmp_path)
    loop_devices.attach(image("web", {"usr/sbin/web": "w", "etc/web.conf": "w"}))
    daemon.update_config({"writable": {"fallback": "tmpfs"}, "stack": PATHS[path]})
    daemon.start()
    subs.check("with nothing attached")
    etc = sandbox_root / "etc"
    assert any(m[0] == str(etc) and m[1] == "overlay" for m in mountinfo()), "not stacked"
    stacked = {rel: subs.count(rel) for rel in subs.content}
    (etc / "admin.conf").write_text("beside resolv.conf\n")

    for request in (
        {"action": "attach", "personality": "web"},
        {"action": "detach", "personality": "web"},
        {"action": "attach", "personality": "web"},
    ):
        ok(daemon.request(request))
        subs.check(f"after {request['action']}")
        assert {rel: subs.count(rel) for rel in subs.content} == stacked, request
    daemon.restart()
    subs.check("after a restart")
    ok(daemon.request({"action": "detach", "personality": "web"}))
    subs.check("after the last detach")
    assert {rel: subs.count(rel) for rel in subs.content} == stacked
    assert (etc / "admin.conf").read_text() == "beside resolv.conf\n"
    assert (daemon.runtime_dir / "volatile/upper/_etc/admin.conf").is_file()


def test_a_mount_whose_path_a_personality_removes_comes_back_with_the_path(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
) -> None:
    """A personality that makes usr/share/x a file: the mount on usr/share/x has no place in
    that stack (a warning says so); it is carried again as soon as a stack has the path."""
    subs = Submounts(sandbox_root, tmp_path)
    loop_devices.attach(image("plain", {"usr/bin/plain": "p"}))
    loop_devices.attach(image("filer", {"usr/share/x": b"a file where x was a directory\n"}))
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "plain"}))
    subs.check("after attach")
    ok(daemon.request({"action": "switch", "personalities": ["filer"]}))
    assert read(sandbox_root, "usr/share/x") == b"a file where x was a directory\n"
    assert "event=submount_set_aside" in daemon.log_text()
    assert f"path={sandbox_root}/usr/share/x" in daemon.log_text()
    assert (sandbox_root / "usr/local/file").read_bytes() == subs.content["usr/local"]

    ok(daemon.request({"action": "switch", "personalities": ["plain"]}))
    subs.check("after the path is back")
    ok(daemon.request({"action": "switch", "personalities": ["filer"]}))
    ok(daemon.request({"action": "detach", "personality": "filer"}))
    subs.check("after the last detach")
