"""core/tmpfiles: /var content of an install as tmpfiles.d lines and factory files."""

from __future__ import annotations

from personalityd.core.tmpfiles import quote_field, var_plan
from personalityd.core.upperplan import DIR, FILE, SYMLINK, Entry

USERS = {0: "root", 33: "www-data", 100: "mysql"}
GROUPS = {0: "root", 4: "adm", 33: "www-data", 104: "mysql"}


def test_directories_files_and_links() -> None:
    entries = [
        Entry("var", DIR, 0o755, in_base=DIR, base_meta=(0o755, 0, 0)),
        Entry("var/lib", DIR, 0o755, in_base=DIR, base_meta=(0o755, 0, 0)),
        Entry("var/log", DIR, 0o755, in_base=DIR, base_meta=(0o755, 0, 0)),
        Entry("var/lib/nginx", DIR, 0o755, 33, 33),
        Entry("var/lib/nginx/body", DIR, 0o700, 33, 33),
        Entry("var/log/nginx", DIR, 0o755, 33, 4),
        Entry("var/lib/state.txt", FILE, 0o640, 0, 4),
        Entry("var/lib/current", SYMLINK, 0o777, target="/var/lib/nginx"),
        Entry("var/lib/base-file", FILE, 0o644, in_base=FILE),
    ]
    plan = var_plan(entries, USERS, GROUPS)
    assert plan.lines == [
        "L /var/lib/current - - - - /var/lib/nginx",
        "d /var/lib/nginx 0755 www-data www-data -",
        "d /var/lib/nginx/body 0700 www-data www-data -",
        "C /var/lib/state.txt 0640 root adm - /usr/share/factory/var/lib/state.txt",
        "d /var/log/nginx 0755 www-data adm -",
    ]
    assert [e.path for e in plan.factory] == ["var/lib/state.txt"]
    assert plan.base_files == ["var/lib/base-file"]


def test_a_new_tree_with_files_is_one_copy_with_owner_fixes() -> None:
    entries = [
        Entry("var/lib/mysql", DIR, 0o700, 100, 104),
        Entry("var/lib/mysql/ibdata1", FILE, 0o660, 100, 104),
        Entry("var/lib/mysql/mysql", DIR, 0o700, 100, 104),
        Entry("var/lib/mysql/mysql/user.frm", FILE, 0o660, 100, 104),
        Entry("var/lib/mysql/debian-10.11.flag", FILE, 0o644, 0, 0),
        Entry("var/lib/mysql/link", SYMLINK, 0o777, 0, 0, target="ibdata1"),
        Entry("var/lib/mysql/setuid", FILE, 0o4755, 100, 104),
    ]
    plan = var_plan(entries, USERS, GROUPS)
    assert plan.lines == [
        "C /var/lib/mysql 0700 mysql mysql - /usr/share/factory/var/lib/mysql",
        "z /var/lib/mysql/debian-10.11.flag 0644 root root -",
    ]
    assert len(plan.factory) == len(entries)


def test_changed_base_directory_and_unknown_ids() -> None:
    entries = [
        Entry("var/spool", DIR, 0o1777, 0, 0, in_base=DIR, base_meta=(0o755, 0, 0)),
        Entry("var/games", DIR, 0o2775, 5000, 5001),
    ]
    assert var_plan(entries, USERS, GROUPS).lines == [
        "d /var/games 2775 5000 5001 -",
        "d /var/spool 1777 root root -",
    ]


def test_quoting() -> None:
    assert quote_field("/var/lib/a b") == '"/var/lib/a b"'
    assert quote_field('x"y') == '"x\\"y"'
    assert quote_field("") == '""'
    assert quote_field("plain") == "plain"
