"""core/upperplan: what of an install's overlay upper a personality carries, and as what."""

from __future__ import annotations

from personalityd.core import upperplan as up
from personalityd.core.upperplan import DIR, FILE, SYMLINK, WHITEOUT, Entry


def d(path: str, **kw: object) -> Entry:
    return Entry(path, DIR, **kw)  # type: ignore[arg-type]


def f(path: str, **kw: object) -> Entry:
    return Entry(path, FILE, 0o644, **kw)  # type: ignore[arg-type]


def ln(path: str, target: str, **kw: object) -> Entry:
    return Entry(path, SYMLINK, 0o777, target=target, **kw)  # type: ignore[arg-type]


def test_routes() -> None:
    cases = {
        f("usr/bin/nginx"): up.Route(up.KEEP, dest="usr/bin/nginx"),
        f("etc/nginx/nginx.conf"): up.Route(up.KEEP, dest="etc/nginx/nginx.conf"),
        f("opt/tool/run"): up.Route(up.KEEP, dest="opt/tool/run"),
        f("lib/x86_64-linux-gnu/libfoo.so.1"): up.Route(
            up.KEEP, dest="usr/lib/x86_64-linux-gnu/libfoo.so.1"
        ),
        f("sbin/tool"): up.Route(up.KEEP, dest="usr/sbin/tool"),
        f("var/lib/mysql/ibdata1"): up.Route(up.VAR),
        ln("etc/systemd/system/multi-user.target.wants/nginx.service", "/lib/x"): up.Route(
            up.ENABLE
        ),
        ln("etc/systemd/system/mysql.service", "/lib/systemd/system/mariadb.service"): up.Route(
            up.KEEP, dest="etc/systemd/system/mysql.service"
        ),
    }
    for entry, expected in cases.items():
        assert up.route(entry) == expected, entry.path


def test_dropped_with_reasons() -> None:
    reasons = {
        "etc/passwd": up.R_ACCOUNTS,
        "etc/shadow-": up.R_ACCOUNTS,
        "etc/subuid": up.R_ACCOUNTS,
        "etc/sudoers.d/nginx": up.R_PROTECTED,
        "etc/personalityd/x.toml": up.R_PROTECTED,
        "usr/lib/personalityd/y": up.R_PROTECTED,
        "etc/os-release": up.R_PROTECTED,
        "etc/ld.so.cache": up.R_LDCACHE,
        "etc/resolv.conf": up.R_RUNNING,
        "etc/machine-id": up.R_RUNNING,
        "usr/sbin/policy-rc.d": up.R_POLICY,
        "etc/rc2.d/S01nginx": up.R_SYSV,
        "var/lib/dpkg/status": up.R_PKGSTATE,
        "var/cache/apt/pkgcache.bin": up.R_PKGSTATE,
        "var/log/dpkg.log": up.R_PKGSTATE,
        "var/lib/systemd/deb-systemd-helper-enabled/x": up.R_PKGSTATE,
        "var/log/nginx/error.log": up.R_VAR_TRANSIENT,
        "var/cache/fontconfig/x": up.R_VAR_TRANSIENT,
        "root/.bash_history": up.R_OUTSIDE,
        "run/mysqld/mysqld.pid": up.R_OUTSIDE,
        "tmp/x": up.R_OUTSIDE,
        "home/u/x": up.R_OUTSIDE,
    }
    for path, reason in reasons.items():
        assert up.route(f(path)) == up.Route(up.DROP, reason=reason), path
    assert up.route(ln("etc/systemd/system/x.service", "/dev/null")).reason == up.R_MASKED
    user_link = ln("etc/systemd/user/default.target.wants/p.service", "/x")
    assert up.route(user_link).reason == up.R_USER_UNITS
    # var/log and var/cache directories stay (tmpfiles d lines); their files go.
    assert up.route(d("var/log/nginx")) == up.Route(up.VAR)


def test_plan_keeps_strips_and_lists() -> None:
    entries = [
        d("usr", in_base=DIR),
        d("usr/bin", in_base=DIR),
        Entry("usr/bin/ping", FILE, 0o4755),
        f("usr/bin/new"),
        f("usr/bin/bash", in_base=FILE),  # a base file replaced
        Entry("usr/bin/gone", WHITEOUT, 0),
        d("etc", in_base=DIR),
        d("etc/systemd", in_base=DIR),
        d("etc/systemd/system", in_base=DIR),
        d("etc/systemd/system/multi-user.target.wants"),
        ln("etc/systemd/system/multi-user.target.wants/nginx.service", "/lib/x"),
        ln("etc/systemd/system/sockets.target.wants/a.socket", "/lib/x"),
        d("etc/systemd/system/sockets.target.wants"),
        d("etc/nginx/sites-enabled", opaque=True),  # new, empty: kept
        d("etc/ssl", in_base=DIR, opaque=True),  # hides the base's: listed
        d("etc/ssl/x"),
        f("etc/passwd", in_base=FILE),
        d("var", in_base=DIR),
        d("var/lib/nginx"),
    ]
    plan = up.plan(entries)
    kept = [dest for _entry, dest in plan.keep]
    assert kept == [
        "etc",
        "etc/nginx/sites-enabled",
        "etc/ssl",
        "etc/ssl/x",
        "usr",
        "usr/bin",
        "usr/bin/bash",
        "usr/bin/new",
        "usr/bin/ping",
    ]
    assert plan.enabled == ["nginx.service", "a.socket"]
    assert plan.overridden == ["usr/bin/bash"]
    assert plan.deletions == ["etc/ssl/", "usr/bin/gone"]
    assert ("usr/bin/gone", up.R_WHITEOUT) in plan.dropped
    assert ("etc/passwd", up.R_ACCOUNTS) in plan.dropped
    assert [e.path for e in plan.var] == ["var", "var/lib/nginx"]


def test_dropped_directories_are_listed_once() -> None:
    entries = [d("var/lib/dpkg"), d("var/lib/dpkg/info"), f("var/lib/dpkg/info/x.list")]
    assert up.plan(entries).dropped == [("var/lib/dpkg/", up.R_PKGSTATE)]


def test_non_merged_usr_moves_and_prefers_the_usr_copy() -> None:
    entries = [d("lib"), f("lib/libx.so"), f("usr/lib/libx.so"), f("bin/tool")]
    plan = up.plan(entries)
    assert [dest for _e, dest in plan.keep] == ["usr/bin/tool", "usr/lib", "usr/lib/libx.so"]
    assert ("lib/libx.so", up.R_DUPLICATE) in plan.dropped
