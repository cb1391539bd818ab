"""The daemon over time, end to end: requests that wait, volumes that go and come back, kill -9,
restarts, the writable volume, refused requests and volumes, configuration errors.

Observed from outside the daemon, as in test_stack.py.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox_view import REFUSED, Images, ok, our_mounts, read, stacked_overlays, wait_until

from testkit.daemon import Daemon
from testkit.images import build_writable_image
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.mounts import mountinfo
from testkit.sandbox import BASE_CONF
from testkit.spool import drop
from testkit.users import MemberUser


def test_request_waits_for_a_volume_that_appears_later(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    late = image("late", {"usr/bin/late": b"arrived\n"})
    daemon.start()
    spool = daemon.spool_dir
    drop(spool, "wait", {"action": "attach", "personality": "late", "timeout": 600})
    wait_until(lambda: "event=spool_request file=wait.json" in daemon.log_text(), daemon)
    time.sleep(0.5)  # a moment inside its wait; nothing may answer it but the volume
    assert not (spool / "done/wait.result.json").exists()
    loop_devices.attach(late)
    deadline = time.monotonic() + 120
    while not (spool / "done/wait.result.json").exists():
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        time.sleep(0.1)
    result = json.loads((spool / "done/wait.result.json").read_text())
    assert result["status"] == "ok"
    assert read(sandbox_root, "usr/bin/late") == b"arrived\n"

    missing = daemon.request({"action": "attach", "personality": "never", "timeout": 1})
    assert (missing["_dir"], missing["code"]) == ("failed", "timeout")


def test_surprise_removal_and_return(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    base_img = image("lower", {"usr/bin/tool": b"lower\n"})
    top_img = image("upper", {"usr/bin/tool": b"upper\n", "usr/bin/only-upper": "u"})
    loop_devices.attach(base_img)
    top = loop_devices.attach(top_img)
    daemon.start()
    ok(daemon.request({"action": "switch", "personalities": ["lower", "upper"]}))
    assert read(sandbox_root, "usr/bin/tool") == b"upper\n"

    loop_devices.yank(top)
    wait_until(lambda: read(sandbox_root, "usr/bin/tool") == b"lower\n", daemon)
    assert not (sandbox_root / "usr/bin/only-upper").exists()
    states = json.loads((daemon.state_dir / "state.json").read_text())
    assert [e["name"] for e in states["desired"]] == ["lower", "upper"]

    loop_devices.attach(top_img)
    wait_until(lambda: read(sandbox_root, "usr/bin/tool") == b"upper\n", daemon)
    assert read(sandbox_root, "usr/bin/only-upper") == b"u"


def test_kill9_during_switches_recovers_consistent_stack(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    for name in ("k1", "k2", "k3"):
        loop_devices.attach(image(name, {"usr/bin/tool": name, f"etc/{name}.conf": name}))
    loop_devices.attach(build_writable_image(sandbox_root.parent), read_only=False)
    daemon.start()
    ok(daemon.request({"action": "switch", "personalities": ["k1", "k2"]}))
    rng = random.Random(7)
    for round_ in range(6):
        target = rng.sample(["k1", "k2", "k3"], 2)
        spool = daemon.spool_dir
        drop(spool, f"kill-{round_}", {"action": "switch", "personalities": target})
        time.sleep(rng.uniform(0, 0.08))
        daemon.kill9()
        daemon.start()
        answer = spool / f"done/kill-{round_}.result.json"
        wait_until(answer.exists, daemon)
        assert read(sandbox_root, "usr/bin/tool") == target[-1].encode()
        for hierarchy in ("/usr", "/etc"):
            assert len(stacked_overlays(sandbox_root, hierarchy)) == 1
        volumes = sorted(p.name for p in (sandbox_root / "opt/personality").iterdir())
        assert volumes == sorted(target)
        mount_points = [m[0] for m in our_mounts(sandbox_root)]
        assert len(mount_points) == len(set(mount_points)), mount_points
    # The mount table after a clean restart equals the one after the crashes.
    after_crashes = our_mounts(sandbox_root)
    daemon.restart()
    assert our_mounts(sandbox_root) == after_crashes


def test_writes_land_on_writable_volume_and_survive(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path, tmp_path: Path
) -> None:
    loop_devices.attach(image("cfg-a", {"etc/a.conf": "a"}))
    loop_devices.attach(image("cfg-b", {"etc/b.conf": "b"}))
    writable_img = build_writable_image(tmp_path)
    writable = loop_devices.attach(writable_img, read_only=False)
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "cfg-a"}))

    (sandbox_root / "etc/local.conf").write_text("mine\n")
    (sandbox_root / "etc/base.conf").write_text("edited\n")
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    upper = daemon.runtime_dir / "writable/upper/_etc"
    assert (upper / "local.conf").read_text() == "mine\n"
    ok(daemon.request({"action": "detach", "personality": "cfg-a"}))
    # The upper stays stacked with nothing attached: the writes still show, and the base
    # itself (seen through the daemon's read-only reference to it) is untouched.
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    assert read(sandbox_root, "etc/base.conf") == b"edited\n"
    assert (daemon.runtime_dir / "base/_etc/base.conf").read_text() == BASE_CONF
    ok(daemon.request({"action": "switch", "personalities": ["cfg-b"]}))
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    assert read(sandbox_root, "etc/base.conf") == b"edited\n"
    daemon.restart()
    assert read(sandbox_root, "etc/local.conf") == b"mine\n"
    # The upper really is the writable volume: its mount's source is that device.
    writable_mount = str(daemon.runtime_dir / "writable")
    assert any(m[0] == writable_mount and m[2] == writable for m in mountinfo())


def test_requests_present_at_start_are_handled_in_order(
    daemon_factory: Callable[..., Daemon],
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("early", {"usr/bin/early": "e"}))
    loop_devices.attach(image("later", {"usr/bin/tool": "later"}))
    daemon = daemon_factory()
    spool = daemon.spool_dir
    spool.mkdir(parents=True)
    for i, body in enumerate(
        [
            {"action": "attach", "personality": "early"},
            {"action": "attach", "personality": "later"},
            {"action": "detach", "personality": "early"},
        ]
    ):
        path = spool / f"q{i}.json"
        path.write_text(json.dumps(body))
        os.utime(path, (1000 + i, 1000 + i))
    daemon.start()
    wait_until(lambda: (spool / "done/q2.result.json").exists(), daemon)
    final = json.loads((spool / "done/q2.result.json").read_text())
    assert final["attached"] == ["later"]


def test_every_spool_refusal_gets_a_result_and_daemon_keeps_serving(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("svc", {"usr/bin/svc": "s"}))
    daemon.start()
    spool = daemon.spool_dir
    cases: dict[str, tuple[object, str]] = {
        "not-json": (b"{nope", "invalid-request"),
        "not-utf8": (b'{"action": "attach", "personality": "\xff"}', "invalid-request"),
        "unknown-field": ({"action": "attach", "personality": "svc", "x": 1}, "invalid-request"),
        "missing-field": ({"action": "attach"}, "invalid-request"),
        "bad-action": ({"action": "format", "personality": "svc"}, "invalid-request"),
        "bad-name": ({"action": "attach", "personality": "../etc"}, "invalid-name"),
        "long-name": ({"action": "attach", "personality": "a" * 200}, "invalid-name"),
        "unknown": ({"action": "attach", "personality": "nosuch"}, "no-such-personality"),
    }
    for name, (body, code) in cases.items():
        result = daemon.request(body, name=name)  # type: ignore[arg-type]
        assert (result["_dir"], result["status"], result["code"]) == ("failed", "error", code)
        assert result["message"]
        assert (spool / "failed" / f"{name}.json").exists()
    (spool / "big.json").write_bytes(b" " * (65 * 1024))
    os.symlink("/etc/shadow", spool / "link.json")
    os.mkfifo(spool / "fifo.json")
    nobody = spool / ".nobody"
    nobody.write_text(json.dumps({"action": "attach", "personality": "svc"}))
    os.chown(nobody, 65534, 65534)
    os.rename(nobody, spool / "nobody.json")
    # The owner is who asks: nobody is not in the personality group.
    codes = {"big": "invalid-request", "link": "invalid-request", "fifo": "invalid-request",
             "nobody": "access-denied"}  # fmt: skip
    for name, code in codes.items():
        wait_until((spool / f"failed/{name}.result.json").exists, daemon)
        result = json.loads((spool / f"failed/{name}.result.json").read_text())
        assert result["code"] == code, result
    assert (spool / "failed/link.json").is_symlink()
    assert ok(daemon.request({"action": "attach", "personality": "svc"}))["changed"] is True


def _answered(spool: Path, stem: str) -> bool:
    return any((spool / d / f"{stem}.result.json").exists() for d in ("done", "failed"))


def test_spool_request_is_judged_by_its_owner_and_the_owners_groups(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    member_user: MemberUser,
    personality_gid: int,
) -> None:
    """The owner of a request file is the caller: a member of `personality` may attach; the
    file's group does not make its owner a member."""
    loop_devices.attach(image("svc", {"usr/bin/svc": "s"}))
    daemon.start()
    spool = daemon.spool_dir
    owners = {"member": (member_user.uid, member_user.gid), "grouped": (65534, personality_gid)}
    for stem, (uid, gid) in owners.items():
        staged = spool / f".{stem}"
        staged.write_text(json.dumps({"action": "attach", "personality": "svc"}))
        os.chown(staged, uid, gid)
        os.rename(staged, spool / f"{stem}.json")
        wait_until(functools.partial(_answered, spool, stem), daemon)
    member = json.loads((spool / "done/member.result.json").read_text())
    assert (member["status"], member["changed"], member["attached"]) == ("ok", True, ["svc"])
    grouped = json.loads((spool / "failed/grouped.result.json").read_text())
    assert grouped["code"] == "access-denied", grouped
    assert "only allowed for root and members of the group 'personality'" in grouped["message"]
    assert f"spool file member.json (uid {member_user.uid})" in daemon.log_text()


def test_incompatible_volume_needs_force_and_unrecognised_is_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(image("fedora-only", {"usr/bin/f": "f"}, manifest={"ID": "fedora"}))
    loop_devices.attach(image("nomanifest", {"usr/bin/n": "n"}, with_manifest=False))
    daemon.start()
    refused = daemon.request({"action": "attach", "personality": "fedora-only"})
    assert (refused["_dir"], refused["code"]) == ("failed", "incompatible")
    assert "fedora" in refused["message"]
    ok(daemon.request({"action": "attach", "personality": "fedora-only", "force": True}))
    assert read(sandbox_root, "usr/bin/f") == b"f"
    entry = journal.entries(REFUSED, _PID=str(daemon.pid))[0]
    assert "manifest" in entry["PERSONALITY_REASON"]
    assert entry["PERSONALITY_DEVICE"].startswith("/dev/loop")


def test_writable_volume_of_wrong_filesystem_is_refused_not_used(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    tmp_path: Path,
    journal: JournalReader,
) -> None:
    fat = tmp_path / "fat.img"
    subprocess.run(["truncate", "-s", "8M", str(fat)], check=True)
    subprocess.run(["mkfs.vfat", "-n", "PDATA", str(fat)], check=True, capture_output=True)
    loop_devices.attach(image("rw-app", {"etc/app.conf": "a"}))
    device = loop_devices.attach(fat, read_only=False)
    daemon.update_config({"writable": {"match": [{"ID_FS_LABEL": "PDATA"}]}})
    daemon.start()
    entry = journal.entries(REFUSED, _PID=str(daemon.pid), PERSONALITY_DEVICE=device)[0]
    assert "vfat" in entry["PERSONALITY_REASON"]
    ok(daemon.request({"action": "attach", "personality": "rw-app"}))
    assert read(sandbox_root, "etc/app.conf") == b"a"
    with pytest.raises(OSError) as exc:  # fallback "none": a read-only stack, loudly
        (sandbox_root / "etc/new.conf").write_text("x")
    assert exc.value.errno == errno.EROFS


def test_config_unknown_key_warns_and_bad_value_refuses_start(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.update_config({"stack": {"hierachies": ["/usr"]}})
    daemon.start()
    assert "unknown key 'stack.hierachies'" in daemon.log_text()
    assert str(daemon.config_path) in daemon.log_text()
    daemon.stop()

    bad = tmp_path / "bad.toml"
    bad.write_text('[writable]\nfallback = "ramdisk"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "personalityd", "--config", str(bad), "--root", str(daemon.root)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "daemon")},
    )
    assert proc.returncode != 0
    assert str(bad) in proc.stderr
    assert "writable.fallback" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback


def test_sigterm_keeps_waiting_spool_request_for_the_next_start(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    later = image("after-restart", {"usr/bin/after": b"restarted\n"})
    daemon.start()
    spool = daemon.spool_dir
    drop(spool, "waiting", {"action": "attach", "personality": "after-restart", "timeout": 600})
    wait_until(lambda: "event=spool_request file=waiting.json" in daemon.log_text(), daemon)
    assert daemon.stop() == 0
    assert (spool / "waiting.json").exists()  # not lost, not answered
    assert not (spool / "failed/waiting.result.json").exists()
    loop_devices.attach(later)
    daemon.start()
    wait_until((spool / "done/waiting.result.json").exists, daemon)
    assert read(sandbox_root, "usr/bin/after") == b"restarted\n"
