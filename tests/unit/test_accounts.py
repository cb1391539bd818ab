"""core/accounts: the account files before and after an install, as sysusers.d lines."""

from __future__ import annotations

from personalityd.core import accounts

BASE_PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
BASE_GROUP = "root:x:0:\nadm:x:4:\nwww-data:x:33:\nssl-cert:x:101:\nnogroup:x:65534:\n"


def test_new_user_with_its_own_group() -> None:
    passwd = BASE_PASSWD + "mysql:x:100:104:MariaDB Server,,,:/nonexistent:/bin/false\n"
    group = BASE_GROUP + "mysql:x:104:\n"
    changes = accounts.diff_accounts(BASE_PASSWD, BASE_GROUP, passwd, group)
    lines = accounts.sysusers_lines(changes, accounts.parse_group(group))
    assert lines == [
        "g mysql 104",
        'u mysql 100:mysql "MariaDB Server,,," /nonexistent /bin/false',
    ]
    assert changes.not_carried == ()


def test_user_in_a_base_group_and_memberships() -> None:
    passwd = BASE_PASSWD + "_minetest:x:101:65534::/var/games/minetest-server:/usr/sbin/nologin\n"
    group = BASE_GROUP.replace("adm:x:4:", "adm:x:4:_minetest").replace(
        "ssl-cert:x:101:", "ssl-cert:x:101:www-data"
    )
    changes = accounts.diff_accounts(BASE_PASSWD, BASE_GROUP, passwd, group)
    lines = accounts.sysusers_lines(changes, accounts.parse_group(group))
    assert lines == [
        "u _minetest 101:nogroup - /var/games/minetest-server /usr/sbin/nologin",
        "m _minetest adm",
        "m www-data ssl-cert",
    ]


def test_changes_to_base_accounts_are_named_not_carried() -> None:
    passwd = BASE_PASSWD.replace("/var/www:/usr/sbin/nologin", "/srv/www:/bin/sh")
    changes = accounts.diff_accounts(BASE_PASSWD, BASE_GROUP, passwd, BASE_GROUP)
    assert changes.users == ()
    assert changes.not_carried == ("user www-data of the base changed",)
    gone = accounts.diff_accounts(BASE_PASSWD, BASE_GROUP, BASE_PASSWD, "root:x:0:\n")
    assert "group adm of the base removed" in gone.not_carried


def test_nothing_changed_gives_no_lines() -> None:
    changes = accounts.diff_accounts(BASE_PASSWD, BASE_GROUP, BASE_PASSWD, BASE_GROUP)
    assert accounts.sysusers_lines(changes, accounts.parse_group(BASE_GROUP)) == []


def test_malformed_lines_are_skipped() -> None:
    users = accounts.parse_passwd("# comment\nbad line\nx:x:notanumber:0:::\n+nis\nok:x:5:5::/:\n")
    assert list(users) == ["ok"]
    groups = accounts.parse_group("g:x:7:a,,b\nbroken\n")
    assert groups["g"].members == ("a", "b")


def test_names_by_id_first_wins() -> None:
    users = accounts.parse_passwd("a:x:5:5::/:\nb:x:5:5::/:\n")
    assert accounts.names_by_id(list(users.values())) == {5: "a"}
