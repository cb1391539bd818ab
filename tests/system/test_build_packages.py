"""`personalityctl build --packages` against the system test's Debian rootfs, for real.

The rootfs (bookworm minbase + systemd + python3, `nspawn.rootfs_tarball()`) is unpacked once
and used as `--base`; the builder installs Debian's own packages over it in its sandbox and
the tests look into the image it wrote. No container is booted. Downloads are cached in
`.cache/apt`, so a warm run needs the network only for `apt-get update` (once an hour).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn import REPO, rootfs_tarball, run, unpack_rootfs

CACHE_DIR = REPO / ".cache" / "apt"
PROTECTED_IN_IMAGE = (
    "etc/passwd",
    "etc/shadow",
    "etc/group",
    "etc/gshadow",
    "etc/os-release",
    "usr/lib/os-release",
    "etc/sudoers",
    "etc/sudoers.d",
    "etc/personalityd",
    "usr/lib/personalityd",
)
NEVER_IN_IMAGE = (
    "var",
    "etc/ld.so.cache",
    "usr/sbin/policy-rc.d",
    "etc/resolv.conf",
    "etc/machine-id",
    "run",
    "tmp",
    "etc/systemd/system/multi-user.target.wants",
)


# -- helpers ----------------------------------------------------------------------------------


def personalityctl(
    *args: str | os.PathLike[str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "daemon"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "personalityd.client.cli", *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def build(base: Path, out: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return personalityctl("build", "--base", base, "--cache-dir", CACHE_DIR, "-o", out, *args)


def snapshot(root: Path) -> str:
    """A digest of everything under `root`: names, types, modes, owners, times, contents,
    link targets and extended attributes."""
    digest = hashlib.sha256()
    paths = [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths += [os.path.join(dirpath, n) for n in sorted(dirnames + filenames)]
    for path in paths:
        st = os.lstat(path)
        fields = [path, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                  st.st_ctime_ns, st.st_rdev, st.st_nlink]  # fmt: skip
        if os.path.islink(path):
            fields.append(os.readlink(path))
        else:
            xattrs = sorted(os.listxattr(path, follow_symlinks=False))
            fields += [(x, os.getxattr(path, x, follow_symlinks=False)) for x in xattrs]
        digest.update(repr(fields).encode())
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def listing(image: Path) -> dict[str, str]:
    """path -> `unsquashfs -lls` mode string, for every entry of a squashfs image."""
    out = run("unsquashfs", "-d", "", "-lln", image).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[0][0] in "-dlcbps":
            path = parts[5].split(" -> ")[0].lstrip("/")
            found[path] = parts[0]
    return found


def cat(image: Path, path: str) -> str:
    return run("unsquashfs", "-cat", image, path).stdout


def make_deb(directory: Path, name: str, version: str = "1.0", **fields: str) -> Path:
    """A tiny arch-all .deb; `files`, `postinst` and other control fields from `fields`."""
    root = directory / f"{name}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    files = json.loads(fields.pop("files", "{}"))
    modes = json.loads(fields.pop("modes", "{}"))
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(int(modes.get(rel, "755" if "/bin/" in rel else "644"), 8))
    postinst = fields.pop("postinst", "")
    control = {
        "Package": name,
        "Version": version,
        "Architecture": "all",
        "Maintainer": "personalityd tests <tests@example.invalid>",
        "Description": f"{name}: test package",
        **fields,
    }
    (root / "DEBIAN/control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
    if postinst:
        (root / "DEBIAN/postinst").write_text(postinst)
        (root / "DEBIAN/postinst").chmod(0o755)
    deb = directory / f"{name}_{version}_all.deb"
    run("dpkg-deb", "--root-owner-group", "--build", root, deb)
    shutil.rmtree(root)
    return deb


def flat_repository(repo: Path, debs: list[Path]) -> None:
    """A flat apt repository (`deb [trusted=yes] file:... ./`) with a hand-written Packages."""
    stanzas = []
    for deb in debs:
        control = run("dpkg-deb", "--field", deb).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
        shutil.copy(deb, repo / deb.name)
    (repo / "Packages").write_text("\n".join(stanzas))


def no_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".personalityctl"))


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    """The unpacked rootfs used as --base by every test here (each checks it stays unchanged)."""
    return unpack_rootfs(rootfs_tarball(), workdir / "build-base")


@pytest.fixture(scope="module")
def base_digest(base: Path) -> str:
    return snapshot(base)


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    assert no_leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def site_tree(workdir: Path) -> Path:
    tree = workdir / "site"
    (tree / "etc/nginx/sites-available").mkdir(parents=True)
    (tree / "etc/nginx/sites-available/default").write_text("# the site's own\n")
    (tree / "usr/share/site").mkdir(parents=True)
    (tree / "usr/share/site/hello.txt").write_text("hello from --tree\n")
    return tree


@pytest.fixture(scope="module")
def service_build(
    base: Path, base_digest: str, workdir: Path, site_tree: Path
) -> tuple[Path, dict[str, Any], str]:
    """memcached (a user its postinst makes, a service it enables) and nginx (/var content)."""
    output = workdir / "svc.squashfs"
    started = time.monotonic()
    proc = build(base, output, "--packages", "memcached", "nginx", "--name", "svc",
                 "--tree", site_tree, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    print(f"svc built in {time.monotonic() - started:.0f} s")
    assert snapshot(base) == base_digest, "the build changed the base"
    return output, json.loads(proc.stdout), proc.stderr


# -- a real build ----------------------------------------------------------------------------


def test_manifest_names_the_base_and_the_services(
    service_build: tuple[Path, dict[str, Any], str],
) -> None:
    image, report, _ = service_build
    manifest = cat(image, "usr/lib/extension-release.d/extension-release.svc")
    fields = dict(line.split("=", 1) for line in manifest.splitlines())
    assert fields["ID"] == "debian"
    assert fields["VERSION_ID"] == "12"
    assert fields["PERSONALITY_SERVICES"].strip('"').split() == [
        "memcached.service",
        "nginx.service",
    ]
    assert "memcached" in fields["PERSONALITY_DESCRIPTION"]
    assert "nginx" in fields["PERSONALITY_DESCRIPTION"]
    assert fields["IMAGE_VERSION"] == report["image_version"]
    assert report["services"] == ["memcached.service", "nginx.service"]


def test_users_become_sysusers_and_var_becomes_tmpfiles(
    service_build: tuple[Path, dict[str, Any], str],
) -> None:
    image, report, _ = service_build
    sysusers = cat(image, "usr/lib/sysusers.d/svc.conf").splitlines()
    assert [ln for ln in sysusers if ln.startswith("u ")] == [
        next(ln for ln in sysusers if ln.startswith("u memcache "))
    ]
    assert any(ln.startswith("g memcache ") for ln in sysusers)
    assert report["users"] == ["memcache"]
    tmpfiles = cat(image, "usr/lib/tmpfiles.d/svc.conf").splitlines()
    assert "d /var/lib/nginx 0755 root root -" in tmpfiles
    assert "d /var/log/nginx 0755 root adm -" in tmpfiles
    assert "C /var/www 0755 root root - /usr/share/factory/var/www" in tmpfiles
    assert report["tmpfiles"] == [ln for ln in tmpfiles if not ln.startswith("#")]
    entries = listing(image)
    assert "usr/share/factory/var/www/html/index.nginx-debian.html" in entries
    assert "nginx" in cat(image, "usr/share/factory/var/www/html/index.nginx-debian.html")


def test_nothing_protected_no_package_database_no_set_id(
    service_build: tuple[Path, dict[str, Any], str],
) -> None:
    image, report, _ = service_build
    entries = listing(image)
    for path in PROTECTED_IN_IMAGE + NEVER_IN_IMAGE:
        assert path not in entries, path
    unwanted = [p for p in entries if p.startswith(("var/", "etc/rc")) or ".wants/" in p]
    assert unwanted == []
    setid = [p for p, mode in entries.items() if mode[3] in "sS" or mode[6] in "sS"]
    assert setid == []
    dropped = {d["path"] for d in report["dropped"]}
    assert {"etc/passwd", "var/lib/dpkg/", "usr/sbin/policy-rc.d"} <= dropped
    # The package's own files and the alternatives links are there, as dpkg left them.
    assert "usr/sbin/nginx" in entries and "usr/bin/memcached" in entries
    assert entries["etc/nginx/sites-enabled/default"].startswith("l")


def test_declarations_apply_with_the_bases_systemd(
    service_build: tuple[Path, dict[str, Any], str], base: Path, workdir: Path
) -> None:
    """The image unpacked over a copy of the base, then systemd-sysusers and systemd-tmpfiles
    (the base's, in a chroot) with the image's files: the user exists and /var is made."""
    image, _, _ = service_build
    root = workdir / "applied"
    run("cp", "-a", "--reflink=auto", base, root, timeout=600)
    try:
        run("unsquashfs", "-q", "-f", "-d", root, image, timeout=300)
        run("chroot", root, "systemd-sysusers", "/usr/lib/sysusers.d/svc.conf")
        run("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t proc proc "$1/proc" && chroot "$1" systemd-tmpfiles --create '
            "/usr/lib/tmpfiles.d/svc.conf", "sh", root)  # fmt: skip
        passwd = (root / "etc/passwd").read_text()
        assert any(line.startswith("memcache:") for line in passwd.splitlines())
        page = root / "var/www/html/index.nginx-debian.html"
        assert "nginx" in page.read_text()
        log_dir = (root / "var/log/nginx").stat()
        adm = next(
            ln for ln in (root / "etc/group").read_text().splitlines() if ln.startswith("adm:")
        )
        assert log_dir.st_gid == int(adm.split(":")[2])
        assert (root / "var/lib/nginx").is_dir()
    finally:
        shutil.rmtree(root)


def test_json_lists_packages_with_versions(
    service_build: tuple[Path, dict[str, Any], str],
) -> None:
    _, report, _ = service_build
    packages = {p["name"]: p["version"] for p in report["packages"]}
    assert {"memcached", "nginx", "nginx-common"} <= set(packages)
    assert all(packages.values())
    assert report["requested"] == ["memcached", "nginx"]
    assert report["base_upgrades"] == []
    for key in ("setid_removed", "overridden_base_files", "dropped", "sysusers", "tmpfiles"):
        assert key in report


def test_tree_is_copied_over_the_packages(
    service_build: tuple[Path, dict[str, Any], str],
) -> None:
    image, _, _ = service_build
    assert cat(image, "etc/nginx/sites-available/default") == "# the site's own\n"
    assert cat(image, "usr/share/site/hello.txt") == "hello from --tree\n"


# -- failures ---------------------------------------------------------------------------------


def _one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("personalityctl: waiting")]
    errors = [ln for ln in errors if "updated the package lists" not in ln]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_unknown_package(base: Path, base_digest: str, out: Path) -> None:
    image = out / "x.squashfs"
    proc = build(base, image, "--packages", "memcached", "no-such-package-xyz", "--name", "x")
    line = _one_line_failure(proc)
    assert "unknown package: no-such-package-xyz" in line
    assert not image.exists()
    assert snapshot(base) == base_digest


def test_postinst_that_fails(base: Path, base_digest: str, out: Path, tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "badpost", postinst="#!/bin/sh\necho failing >&2\nexit 1\n",
                   files=json.dumps({"usr/share/badpost/x": "x\n"}))  # fmt: skip
    image = out / "bad.squashfs"
    line = _one_line_failure(build(base, image, "--packages", deb, "--name", "bad"))
    assert (
        line
        == "personalityctl: package badpost: its post-installation script failed (exit status 1)"
    )
    assert not image.exists()
    assert snapshot(base) == base_digest


def test_local_deb_that_cannot_be_satisfied(base: Path, out: Path, tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "needs-future", Depends="hostname (>= 999)")
    image = out / "f.squashfs"
    line = _one_line_failure(build(base, image, "--packages", deb, "--name", "f"))
    assert "dependency conflict with the base: needs-future Depends: hostname (>= 999)" in line
    assert not image.exists()


# security.capability with cap_net_raw permitted and effective (struct vfs_cap_data, revision 2)
CAP_NET_RAW = "0x02000001, 1 << 13, 0, 0, 0"
SET_CAPABILITY = (
    '#!/bin/sh\nset -e\npython3 -c \'import os, struct; os.setxattr("/usr/bin/hello-local", '
    f'"security.capability", struct.pack("<5I", {CAP_NET_RAW}))\'\n'
)


def test_local_deb_privileges_and_a_second_build_waits_for_the_cache(
    base: Path, base_digest: str, out: Path, tmp_path: Path
) -> None:
    """A local .deb with a set-user-ID file, and a postinst that gives a file capabilities:
    both removed and listed. Meanwhile another holder of the cache lock makes the build wait."""
    deb = make_deb(
        tmp_path,
        "hello-local",
        files=json.dumps(
            {"usr/bin/hello-local": "#!/bin/sh\necho hello\n", "usr/bin/hello-suid": "x\n"}
        ),
        modes=json.dumps({"usr/bin/hello-suid": "4755"}),
        postinst=SET_CAPABILITY,
    )
    image = out / "hello.squashfs"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "daemon"), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-m", "personalityd.client.cli", "build", "--base", str(base),
             "--cache-dir", str(CACHE_DIR), "-o", str(image), "--packages", str(deb),
             "--name", "hello", "--version", "7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        assert not image.exists()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "waiting for another build" in stderr
    assert "Wrote" in stdout
    assert "set-id bits removed: usr/bin/hello-suid (was 4755)" in stdout
    assert "file capabilities removed: usr/bin/hello-local" in stdout
    assert cat(image, "usr/bin/hello-local") == "#!/bin/sh\necho hello\n"
    assert listing(image)["usr/bin/hello-suid"] == "-rwxr-xr-x"
    unpacked = tmp_path / "unpacked"
    run("unsquashfs", "-q", "-d", unpacked, image, "usr/bin/hello-local")
    assert "security.capability" not in os.listxattr(unpacked / "usr/bin/hello-local")
    manifest = cat(image, "usr/lib/extension-release.d/extension-release.hello")
    assert "IMAGE_VERSION=7\n" in manifest
    assert "PERSONALITY_SERVICES" not in manifest
    assert snapshot(base) == base_digest


# -- a package that needs a newer version of a base package ------------------------------------


@pytest.fixture(scope="module")
def repo_base(base: Path, workdir: Path) -> Path:
    """A copy of the base with a flat local repository holding a fake newer `hostname` (a
    package of the base) and a package that depends on it."""
    copy = workdir / "repo-base"
    run("cp", "-a", "--reflink=auto", base, copy, timeout=600)
    repo = copy / "srv/repo"
    repo.mkdir(parents=True)
    debs = workdir / "repo-debs"
    debs.mkdir()
    newer = make_deb(debs, "hostname", "99.0", files=json.dumps(
        {"usr/bin/hostname": "#!/bin/sh\necho fake\n"}))  # fmt: skip
    needs = make_deb(debs, "needs-new-hostname", Depends="hostname (>= 99.0)")
    flat_repository(repo, [newer, needs])
    (copy / "etc/apt/sources.list.d/local.list").write_text("deb [trusted=yes] file:/srv/repo ./\n")
    return copy


def test_base_upgrade_is_refused_naming_both(repo_base: Path, out: Path) -> None:
    image = out / "up.squashfs"
    proc = build(repo_base, image, "--packages", "needs-new-hostname", "--name", "up")
    line = _one_line_failure(proc)
    assert "needs-new-hostname needs a newer hostname than the base has" in line
    assert "3.23+nmu1 -> 99.0" in line
    assert "--allow-base-upgrades" in line
    assert not image.exists()


def test_base_upgrade_allowed_lists_the_overridden_files(repo_base: Path, out: Path) -> None:
    digest = snapshot(repo_base)
    image = out / "up.squashfs"
    proc = build(repo_base, image, "--packages", "needs-new-hostname", "--name", "up",
                 "--allow-base-upgrades")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "base package upgraded into the personality: hostname 3.23+nmu1 -> 99.0" in proc.stdout
    assert "overrides base file: /usr/bin/hostname" in proc.stdout
    assert cat(image, "usr/bin/hostname") == "#!/bin/sh\necho fake\n"
    assert snapshot(repo_base) == digest


def test_usage_errors() -> None:
    both = personalityctl("build", "somedir", "--packages", "x", "--name", "n", "-o", "/tmp/n")
    assert both.returncode == 2 and "takes no DIR" in both.stderr
    neither = personalityctl("build", "--name", "n", "-o", "/tmp/n")
    assert neither.returncode == 2 and "DIR, or --packages" in neither.stderr
    misplaced = personalityctl("build", "somedir", "--base", "/", "--name", "n", "-o", "/tmp/n")
    assert misplaced.returncode == 2 and "--base is for build --packages" in misplaced.stderr
