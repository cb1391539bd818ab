"""A temporary system user in the `personality` group, for the access checks."""

from __future__ import annotations

import contextlib
import grp
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

GROUP = "personality"


@dataclass(frozen=True)
class MemberUser:
    """A temporary system user in the `personality` group (see `temporary_member`)."""

    name: str
    uid: int
    gid: int

    @property
    def setpriv(self) -> tuple[str, ...]:
        """The command prefix that runs a command as this user, with its groups."""
        return ("setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups")


def ensure_group(name: str = GROUP) -> int:
    """The GID of system group `name`, created if missing (and left: it is harmless)."""
    subprocess.run(["groupadd", "-f", "--system", name], check=True)
    return grp.getgrnam(name).gr_gid


@contextlib.contextmanager
def temporary_member(group: str = GROUP) -> Iterator[MemberUser]:
    """A new system user (no home, nologin) in `group`; removed again on exit."""
    name = f"pdtest{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            *("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"),
            *("-G", group, name),
        ],
        check=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield MemberUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False)
