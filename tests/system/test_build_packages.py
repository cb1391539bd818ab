"""`personalityctl build --packages` against the system test's Debian rootfs, for real.

The rootfs (bookworm minbase + systemd + python3, `nspawn.rootfs_tarball()`) is unpacked once
and used as `--base`; the builder installs Debian's own packages over it in its sandbox and
the tests look into the image it wrote. No container is booted. Downloads are cached in
`.cache/apt`, so a warm run needs the network only for `apt-get update` (once an hour).
"""

from __future__ import annotations

import fcntl
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
from debbuild import (
    CACHE_DIR,
    build,
    cat,
    flat_repository,
    listing,
    make_deb,
    personalityctl,
    snapshot,
)
from nspawn import REPO, rootfs_tarball, run, unpack_rootfs

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
    # A site unit, ordered after nginx, enabled the usual way: it joins PERSONALITY_SERVICES.
    units = tree / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "aaa-site.service").write_text(
        "[Unit]\nAfter=nginx.service\n[Service]\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "aaa-site.service").symlink_to("/usr/lib/systemd/system/aaa-site.service")
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
    services = ["memcached.service", "nginx.service", "aaa-site.service"]
    assert fields["PERSONALITY_SERVICES"].strip('"').split() == services
    assert "memcached" in fields["PERSONALITY_DESCRIPTION"]
    assert "nginx" in fields["PERSONALITY_DESCRIPTION"]
    assert fields["IMAGE_VERSION"] == report["image_version"]
    assert report["services"] == services


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


PROBE = """
import sys
from personalityd.adapters.probe import probe_tree
from personalityd.adapters.protected import protected_in_tree
from personalityd.core.protected import DEFAULT_PROTECTED_PATHS
def refuse(tree):
    return protected_in_tree(tree, DEFAULT_PROTECTED_PATHS, ("/usr", "/etc"))
manifest, refusal = probe_tree(sys.argv[1], ("ro", "nodev", "nosuid"), refuse=refuse)
print(manifest.name, refusal)
"""


def probe(image: Path, scratch: Path) -> list[str]:
    """[name, refusal] of the image mounted read-only (in a private mount namespace) and
    probed as the daemon probes a volume under its default mount options."""
    mnt = scratch / "mnt"
    mnt.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "daemon"), env.get("PYTHONPATH", "")])
    script = 'mount -o loop,ro "$1" "$2" && exec "$3" -c "$4" "$2"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(image), str(mnt), sys.executable, PROBE],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(None, 1)


def test_the_daemons_probe_accepts_the_image(
    service_build: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    """No protected path, set-id file, file capability or device node: nothing refused."""
    image, _, _ = service_build
    assert probe(image, tmp_path) == ["svc", "None\n"]


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
    entries = listing(image)
    assert "usr/lib/systemd/system/aaa-site.service" in entries
    assert not [p for p in entries if ".wants" in p]


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


def test_packages_the_base_has_already(base: Path, out: Path) -> None:
    image = out / "p.squashfs"
    line = _one_line_failure(build(base, image, "--packages", "python3", "--name", "p"))
    assert line == "personalityctl: nothing to install: python3 already in the base"
    assert not image.exists()


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
    "rm /etc/issue.net\n"  # a file of the base deleted: a whiteout in the upper
)


def test_local_deb_privileges_and_a_second_build_waits_for_the_cache(
    base: Path, base_digest: str, out: Path, tmp_path: Path
) -> None:
    """A local .deb with a set-user-ID file, and a postinst that gives a file capabilities and
    deletes a file of the base: all removed (the deletion not carried) and listed. Meanwhile
    another holder of the cache lock makes the build wait."""
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
    assert "deletions of base files not carried: 1" in stdout
    assert cat(image, "usr/bin/hello-local") == "#!/bin/sh\necho hello\n"
    entries = listing(image)
    assert entries["usr/bin/hello-suid"] == "-rwxr-xr-x"
    assert "etc/issue.net" not in entries
    assert not [p for p, mode in entries.items() if mode[0] in "cb"]
    unpacked = tmp_path / "unpacked"
    run("unsquashfs", "-q", "-d", unpacked, image, "usr/bin/hello-local")
    assert "security.capability" not in os.listxattr(unpacked / "usr/bin/hello-local")
    assert probe(image, tmp_path) == ["hello", "None\n"]
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
