"""Users and groups that maintainer scripts created, as sysusers.d lines.

The builder compares the account files of the base with those the scripts left behind in the
overlay (`/etc/passwd` and `/etc/group`); the files themselves are never shipped. What the
scripts added becomes, in this order:

- `g NAME GID` for each new group;
- `u NAME UID:GROUP "GECOS" HOME SHELL` for each new user (GROUP is its primary group by name);
- `m USER GROUP` for each membership added to a group (new or of the base).

The numbers are those the scripts got on the base. systemd-sysusers takes them as a
suggestion: when one is already used on the system the personality is attached to, it picks
a free one instead. Nothing in an image depends on the numbers: its files belong to root, and
`/var` content is owned by name in the tmpfiles.d lines.

Pure: text in, lines out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str


@dataclass(frozen=True)
class Group:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class AccountChanges:
    """What the scripts did to the account files, and what cannot be carried."""

    groups: tuple[Group, ...] = ()
    users: tuple[User, ...] = ()
    memberships: tuple[tuple[str, str], ...] = ()  # (user, group)
    not_carried: tuple[str, ...] = field(default=())  # changes to base accounts, in words


def parse_passwd(text: str) -> dict[str, User]:
    """name -> User, for the well-formed lines of a passwd file (in file order)."""
    users: dict[str, User] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) != 7 or not fields[0] or line.startswith(("#", "+", "-")):
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            continue
        users.setdefault(fields[0], User(fields[0], uid, gid, fields[4], fields[5], fields[6]))
    return users


def parse_group(text: str) -> dict[str, Group]:
    """name -> Group, for the well-formed lines of a group file (in file order)."""
    groups: dict[str, Group] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) != 4 or not fields[0] or line.startswith(("#", "+", "-")):
            continue
        try:
            gid = int(fields[2])
        except ValueError:
            continue
        members = tuple(m for m in fields[3].split(",") if m)
        groups.setdefault(fields[0], Group(fields[0], gid, members))
    return groups


def diff_accounts(
    base_passwd: str, base_group: str, new_passwd: str, new_group: str
) -> AccountChanges:
    """What changed between the base's account files and the overlay's."""
    old_users, new_users = parse_passwd(base_passwd), parse_passwd(new_passwd)
    old_groups, new_groups = parse_group(base_group), parse_group(new_group)
    groups = tuple(g for name, g in new_groups.items() if name not in old_groups)
    users = tuple(u for name, u in new_users.items() if name not in old_users)
    memberships: list[tuple[str, str]] = []
    for name, group in new_groups.items():
        before = set(old_groups[name].members) if name in old_groups else set()
        memberships.extend((member, name) for member in group.members if member not in before)
    not_carried = [
        f"user {name} of the base changed"
        for name, user in new_users.items()
        if name in old_users and old_users[name] != user
    ]
    not_carried += [
        f"group {name} of the base changed"
        for name, group in new_groups.items()
        if name in old_groups and group.gid != old_groups[name].gid
    ]
    not_carried += [
        f"user {name} of the base removed" for name in old_users if name not in new_users
    ]
    not_carried += [
        f"group {name} of the base removed" for name in old_groups if name not in new_groups
    ]
    return AccountChanges(groups, users, tuple(memberships), tuple(not_carried))


def _quote(value: str) -> str:
    """A sysusers.d field: '-' when empty, double-quoted when it holds blanks or quotes."""
    if not value:
        return "-"
    if any(c.isspace() for c in value) or '"' in value or "'" in value or value == "-":
        cleaned = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{cleaned}"'
    return value


def sysusers_lines(changes: AccountChanges, all_groups: Mapping[str, Group]) -> list[str]:
    """The sysusers.d lines for `changes`; `all_groups` (the overlay's) names primary groups."""
    by_gid = {g.gid: g.name for g in reversed(list(all_groups.values()))}
    lines = [f"g {_quote(g.name)} {g.gid}" for g in changes.groups]
    for user in changes.users:
        primary = by_gid.get(user.gid, str(user.gid))
        fields = [
            "u",
            _quote(user.name),
            f"{user.uid}:{primary}",
            _quote(user.gecos),
            _quote(user.home),
            _quote(user.shell),
        ]
        lines.append(" ".join(fields))
    lines += [f"m {_quote(user)} {_quote(group)}" for user, group in changes.memberships]
    return lines


def names_by_id(entries: Sequence[User] | Sequence[Group]) -> dict[int, str]:
    """uid or gid -> the first name with that number."""
    found: dict[int, str] = {}
    for entry in entries:
        number = entry.uid if isinstance(entry, User) else entry.gid
        found.setdefault(number, entry.name)
    return found
