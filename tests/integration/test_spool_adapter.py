"""The request spool on real files: refusals, ownership, filing results (the watcher:
test_spool_watcher.py)."""

from __future__ import annotations

import contextlib
import datetime
import grp
import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from spool_files import BODY, drop

from personalityd.adapters.groups import group_gids, user_gids
from personalityd.adapters.spool import (
    RequestGone,
    SpoolFile,
    ensure_spool_dirs,
    finish_request,
    list_pending,
    read_request,
    result_body,
)
from personalityd.core.access import SPOOL, Caller, authorize
from personalityd.core.errors import AccessDenied, InvalidRequest, NoSuchPersonality

pytestmark = pytest.mark.integration


NOBODY = pwd.getpwnam("nobody")


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when the body blocks (SIGALRM interrupts a blocking open)."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ensure_spool_dirs, list_pending, SpoolFile


def test_ensure_spool_dirs(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "spool"
    ensure_spool_dirs(directory, group=NOBODY.pw_gid)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o1730
    assert directory.stat().st_gid == NOBODY.pw_gid
    assert (directory / "done").is_dir()
    assert (directory / "failed").is_dir()
    os.chmod(directory, 0o755)
    ensure_spool_dirs(directory)  # existing directories are left alone
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    private = tmp_path / "b" / "spool"
    ensure_spool_dirs(private)  # no group to share it with: root only
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_list_pending_order_and_filter(spool_dir: Path) -> None:
    names = ["b.json", "a.json", "c.json"]
    for name in names:
        (spool_dir / name).write_bytes(BODY)
    os.utime(spool_dir / "c.json", ns=(1_000_000_000, 1_000_000_000))  # oldest
    for name in ("a.json", "b.json"):  # same time: by name
        os.utime(spool_dir / name, ns=(2_000_000_000, 2_000_000_000))
    os.symlink("/etc/shadow", spool_dir / "link.json")
    os.utime(spool_dir / "link.json", ns=(3_000_000_000, 3_000_000_000), follow_symlinks=False)
    for ignored in (".hidden.json", "x.result.json", "notes.txt", ".json"):
        (spool_dir / ignored).write_bytes(BODY)
    assert [p.name for p in list_pending(spool_dir)] == [
        "c.json",
        "a.json",
        "b.json",
        "link.json",
    ]


def test_spool_file() -> None:
    f = SpoolFile.of(Path("/spool/req-1.json"))
    assert (f.stem, f.name, f.result_name) == ("req-1", "req-1.json", "req-1.result.json")


# read_request


def test_read_regular_file(spool_dir: Path) -> None:
    path = drop(spool_dir, "r.json")
    assert read_request(path).body == BODY


def test_read_exactly_64_kib(spool_dir: Path) -> None:
    body = b" " * (64 * 1024)
    path = drop(spool_dir, "r.json", body)
    assert read_request(path).body == body


def test_symlink_to_shadow_refused_without_opening(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = spool_dir / "evil.json"
    os.symlink("/etc/shadow", link)
    opened: list[object] = []
    real_open = os.open

    def spy_open(path: object, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy_open)
    with pytest.raises(InvalidRequest, match=r"evil\.json: refused, it is a symlink"):
        read_request(link)
    assert opened == []


def test_fifo_refused_without_blocking(spool_dir: Path) -> None:
    fifo = spool_dir / "fifo.json"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(InvalidRequest, match="it is a FIFO"):
        read_request(fifo)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "a character device"),
        (lambda p: os.mknod(p, stat.S_IFBLK | 0o600, os.makedev(7, 0)), "a block device"),
    ],
)
def test_other_kinds_refused(spool_dir: Path, make: object, kind: str) -> None:
    path = spool_dir / "odd.json"
    make(path)  # type: ignore[operator]
    with pytest.raises(InvalidRequest, match=f"it is {kind}"):
        read_request(path)


def test_large_file_refused(spool_dir: Path) -> None:
    path = spool_dir / "big.json"
    path.write_bytes(b" " * (1024 * 1024))
    with pytest.raises(InvalidRequest, match="1048576 bytes is larger than 64 KiB"):
        read_request(path)
    path.write_bytes(b" " * (64 * 1024 + 1))
    with pytest.raises(InvalidRequest, match="larger than 64 KiB"):
        read_request(path)


def test_owner_is_reported_not_judged(spool_dir: Path) -> None:
    """The owner is who asks; whether they may is the manager's decision (core/access.py)."""
    path = drop(spool_dir, "r.json")
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    assert read_request(path).owner == NOBODY.pw_uid
    os.chown(path, 4_000_000, 4_000_000)
    assert read_request(path).owner == 4_000_000


def test_vanished_request(spool_dir: Path) -> None:
    with pytest.raises(RequestGone):
        read_request(spool_dir / "gone.json")


@dataclass(frozen=True)
class TempAccounts:
    group: str
    gid: int
    member: str  # the group is one of its supplementary groups
    primary: str  # the group is its primary group


@pytest.fixture
def accounts() -> Iterator[TempAccounts]:
    """A temporary system group with two members, removed afterwards."""
    token = secrets.token_hex(4)
    group, member, primary = f"pdt-g-{token}", f"pdt-m-{token}", f"pdt-p-{token}"
    created_users: list[str] = []
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        common = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*common, "-N", "-g", "nogroup", "-G", group, member], check=True)
        created_users.append(member)
        subprocess.run([*common, "-N", "-g", group, primary], check=True)
        created_users.append(primary)
        yield TempAccounts(group, grp.getgrnam(group).gr_gid, member, primary)
    finally:
        for user in created_users:
            subprocess.run(["userdel", user], check=False)
        subprocess.run(["groupdel", group], check=False)


def test_owner_groups_decide(accounts: TempAccounts) -> None:
    """A member by a supplementary or the primary group may change the stack; others not."""
    gids = group_gids([accounts.group, "no-such-group-pd"])
    assert gids == {accounts.gid}
    for user in (accounts.member, accounts.primary):
        uid = pwd.getpwnam(user).pw_uid
        caller = Caller(uid, user_gids(uid), user, front_end=SPOOL)
        authorize(caller, "Attach", [accounts.group], gids)
        with pytest.raises(AccessDenied, match="Attach is only allowed for root and members"):
            authorize(caller, "Attach", ["personality"], group_gids(["personality"]))
    assert user_gids(4_000_000) == frozenset()


# result_body and finish_request


def test_result_body_success_and_error() -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ok = result_body("abc", None, True, ["base-tools", "web"], 7)
    after = datetime.datetime.now(datetime.UTC)
    assert ok["id"] == "abc"
    assert ok["status"] == "ok"
    assert ok["code"] == ""
    assert ok["message"] == "stack changed to generation 7: base-tools web"
    assert ok["changed"] is True
    assert ok["attached"] == ["base-tools", "web"]
    assert ok["generation"] == 7
    finished = datetime.datetime.fromisoformat(ok["finished"].replace("Z", "+00:00"))
    assert finished.tzinfo == datetime.UTC
    assert before <= finished <= after  # the time it was made, to the millisecond it keeps
    assert result_body(None, None, False, [], 0, message="attached 'web'")["message"] == (
        "attached 'web'"
    )
    assert result_body(None, None, False, [], 3)["message"] == "nothing to change: no personalities"
    error = result_body(None, NoSuchPersonality("no personality 'web'"), False, ["x"], 3)
    assert error["id"] is None
    assert (error["status"], error["code"], error["message"]) == (
        "error",
        "no-such-personality",
        "no personality 'web'",
    )
    assert set(error) == set(ok)


def test_finish_request_ok_and_failed(spool_dir: Path) -> None:
    path = drop(spool_dir, "req.json")
    body = result_body("1", None, True, ["web"], 1)
    assert finish_request(spool_dir, path, True, body) == spool_dir / "done" / "req.json"
    assert not path.exists()
    assert (spool_dir / "done" / "req.json").read_bytes() == BODY
    assert json.loads((spool_dir / "done" / "req.result.json").read_text()) == body
    assert stat.S_IMODE((spool_dir / "done" / "req.result.json").stat().st_mode) == 0o644

    # The same name again, failing this time: only the latest outcome stays.
    path = drop(spool_dir, "req.json", b"{}")
    failed_body = result_body("2", InvalidRequest("bad"), False, ["web"], 1)
    finish_request(spool_dir, path, False, failed_body)
    assert sorted(os.listdir(spool_dir / "done")) == []
    assert sorted(os.listdir(spool_dir / "failed")) == ["req.json", "req.result.json"]
    assert json.loads((spool_dir / "failed" / "req.result.json").read_text())["id"] == "2"

    # And failing again: the older one in failed/ is replaced.
    path = drop(spool_dir, "req.json", b"[]")
    finish_request(spool_dir, path, False, result_body("3", InvalidRequest("x"), False, [], 1))
    assert (spool_dir / "failed" / "req.json").read_bytes() == b"[]"
    assert json.loads((spool_dir / "failed" / "req.result.json").read_text())["id"] == "3"
    assert sorted(os.listdir(spool_dir)) == ["done", "failed"]


def test_finish_request_moves_odd_kinds_without_opening(spool_dir: Path) -> None:
    os.symlink("/etc/shadow", spool_dir / "link.json")
    os.mkfifo(spool_dir / "fifo.json")
    (spool_dir / "dir.json").mkdir()
    (spool_dir / "failed" / "dir.json").mkdir()
    (spool_dir / "failed" / "dir.json" / "old").write_text("old")  # a non-empty older one
    with deadline(5):
        for name in ("link.json", "fifo.json", "dir.json"):
            body = result_body(None, InvalidRequest("refused"), False, [], 0)
            finish_request(spool_dir, spool_dir / name, False, body)
    failed = spool_dir / "failed"
    assert os.readlink(failed / "link.json") == "/etc/shadow"
    assert stat.S_ISFIFO(os.lstat(failed / "fifo.json").st_mode)
    assert list((failed / "dir.json").iterdir()) == []
    for stem in ("link", "fifo", "dir"):
        assert (failed / f"{stem}.result.json").is_file()
    assert sorted(os.listdir(spool_dir)) == ["done", "failed"]


def test_finish_vanished_request_still_writes_result(spool_dir: Path) -> None:
    body = result_body(None, InvalidRequest("gone"), False, [], 0)
    finish_request(spool_dir, spool_dir / "gone.json", False, body)
    assert (spool_dir / "failed" / "gone.result.json").is_file()
    assert not (spool_dir / "failed" / "gone.json").exists()
