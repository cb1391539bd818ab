"""core/aptout: apt-get's simulation and errors, dpkg's failures and status database."""

from __future__ import annotations

from personalityd.core import aptout

SIMULATION = """\
Reading package lists...
Building dependency tree...
The following NEW packages will be installed:
  libevent-2.1-7 memcached
Inst libevent-2.1-7 (2.1.12-stable-8 Debian:12.15/oldstable [amd64])
Inst libc6 [2.36-9] (2.36-9+deb12u4 Debian:12.15/oldstable [amd64])
Inst memcached (1.6.18-1 Debian:12.15/oldstable [amd64])
Remv exim4-base [4.96-15]
Conf libevent-2.1-7 (2.1.12-stable-8 Debian:12.15/oldstable [amd64])
Conf memcached (1.6.18-1 Debian:12.15/oldstable [amd64])
"""


def test_simulation_actions() -> None:
    actions = aptout.parse_simulation(SIMULATION)
    assert [a.package for a in actions] == ["libevent-2.1-7", "libc6", "memcached", "exim4-base"]
    assert actions[0] == aptout.Action("libevent-2.1-7", "2.1.12-stable-8", "")
    assert actions[0].is_new
    assert actions[1] == aptout.Action("libc6", "2.36-9+deb12u4", "2.36-9")
    assert actions[3].is_removal and actions[3].installed == "4.96-15"
    assert [a.package for a in aptout.base_changes(actions)] == ["libc6", "exim4-base"]


def test_unknown_packages() -> None:
    out = (
        "Reading package lists...\nE: Unable to locate package nosuchpkg\n"
        "E: Package 'ghost' has no installation candidate\n"
    )
    assert aptout.unknown_packages(out) == ["nosuchpkg", "ghost"]
    assert aptout.unknown_packages(SIMULATION) == []


def test_unmet_dependencies() -> None:
    out = """\
Some packages could not be installed.
The following packages have unmet dependencies:
 needs-new-libc : Depends: libc6 (>= 2.99) but 2.36-9 is to be installed
                  Depends: libfoo but it is not installable
 other : Conflicts: bash
E: Unable to correct problems, you have held broken packages.
"""
    assert aptout.unmet_dependencies(out) == [
        "needs-new-libc Depends: libc6 (>= 2.99) but 2.36-9 is to be installed",
        "needs-new-libc Depends: libfoo but it is not installable",
        "other Conflicts: bash",
    ]
    assert aptout.last_error(out) == "Unable to correct problems, you have held broken packages."


def test_dpkg_failures() -> None:
    out = """\
Setting up badpost (1.0) ...
dpkg: error processing package badpost (--configure):
 installed badpost package post-installation script subprocess returned error exit status 1
dpkg: error processing archive /run/personalityd-build/debs/badpre_1.0_all.deb (--unpack):
 new badpre package pre-installation script subprocess returned error exit status 3
Errors were encountered while processing:
 badpost
E: Sub-process /usr/bin/dpkg returned an error code (1)
"""
    failures = aptout.dpkg_failures(out)
    assert [f.message() for f in failures] == [
        "package badpost: its post-installation script failed (exit status 1)",
        "package badpre: its pre-installation script failed (exit status 3)",
    ]
    other = aptout.dpkg_failures(
        "dpkg: error processing package x (--configure):\n dependency problems - leaving\n"
    )
    assert other[0].message() == "package x: dpkg --configure failed: dependency problems - leaving"


def test_dpkg_status_and_what_the_build_installed() -> None:
    base = (
        "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9\nArchitecture: amd64\n"
        "Description: x\n continued: line\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n"
    )
    after = base.replace("2.36-9", "2.36-9+deb12u4") + (
        "\n\nPackage: nginx\nStatus: install ok installed\nVersion: 1.22.1-9\nArchitecture: amd64\n"
    )
    assert set(aptout.parse_dpkg_status(base)) == {"libc6"}
    assert aptout.installed_by_build(base, after) == [
        aptout.Installed("libc6", "2.36-9+deb12u4", "amd64"),
        aptout.Installed("nginx", "1.22.1-9", "amd64"),
    ]
