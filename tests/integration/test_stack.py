"""The daemon end to end: volumes from udev, stacks, conflicts, spool requests, recovery.

Everything is observed from outside the daemon: files through the sandbox root, mountinfo,
journal entries read back with journalctl, and spool result files.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    BASE_CONF,
    BASE_TOOL_BYTES,
    Daemon,
    JournalReader,
    LoopDevices,
    build_image,
    build_writable_image,
    drop,
    field_list,
    mountinfo,
)

CONFLICT = "3e47b2d0af514d77b3126415a1549afb"
SUMMARY = "745778a2970b4475acba70df8299437b"
REFUSED = "18d0afe90a164b398024e69871a6bc44"
FAILED = "091e1791abd44213b5aa028ad69c8fce"

Images = Callable[..., Path]


@pytest.fixture
def image(tmp_path: Path) -> Images:
    """`image(name, files, fmt="squashfs", **kw)`: a personality image in this test's tmp."""

    def make(name: str, files: dict[str, object], fmt: str = "squashfs", **kw: object) -> Path:
        return build_image(tmp_path, name, files, fmt, **kw)  # type: ignore[arg-type]

    return make


def read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["status"] == "ok", result
    assert result["_dir"] == "done"
    return result


def our_mounts(root: Path) -> list[tuple[str, str, str]]:
    prefix = str(root) + "/"
    return sorted(m for m in mountinfo() if m[0].startswith(prefix))


def stacked_overlays(root: Path, hierarchy: str) -> list[tuple[str, str, str]]:
    target = str(root / hierarchy.lstrip("/"))
    return [m for m in mountinfo() if m[0] == target and m[1] == "overlay"]


def test_attach_shows_files_and_mounts_volume_read_only(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("web", {"usr/sbin/nginx": b"nginx v1\n", "etc/nginx.conf": "x"}))
    daemon.start()

    result = ok(daemon.request({"action": "attach", "personality": "web", "id": "r-1"}))

    assert result["id"] == "r-1"
    assert result["changed"] is True
    assert result["attached"] == ["web"]
    assert read(sandbox_root, "usr/sbin/nginx") == b"nginx v1\n"
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert read(sandbox_root, "etc/base.conf") == BASE_CONF.encode()
    volume = sandbox_root / "opt/personality/web"
    assert (volume / "usr/sbin/nginx").read_bytes() == b"nginx v1\n"
    with pytest.raises(OSError) as exc:
        (volume / "usr/sbin/new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    options = subprocess.run(
        ["findmnt", "-n", "-o", "OPTIONS", str(volume)], capture_output=True, text=True, check=True
    ).stdout
    assert {"ro", "nodev", "nosuid"} <= set(options.strip().split(","))
    again = ok(daemon.request({"action": "attach", "personality": "web"}))
    assert again["changed"] is False


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "ext4"])
def test_each_filesystem_type_is_stacked(
    fmt: str, daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    label = "personality-fs" if fmt == "ext4" else None
    loop_devices.attach(image("fs", {"usr/bin/fs-tool": fmt}, fmt, label=label))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "fs"}))
    assert read(sandbox_root, "usr/bin/fs-tool") == fmt.encode()


def test_last_attached_wins_and_conflict_is_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    shared = {"usr/share/doc/README": b"same bytes\n"}
    loop_devices.attach(image("datasci", {"usr/bin/tool": b"datasci\n", **shared}))
    loop_devices.attach(image("webs", {"usr/bin/tool": b"webs\n", **shared}, "erofs"))
    daemon.start()

    ok(daemon.request({"action": "attach", "personality": "datasci"}))
    result = ok(daemon.request({"action": "attach", "personality": "webs"}))

    assert read(sandbox_root, "usr/bin/tool") == b"webs\n"
    generation = result["generation"]
    entries = journal.entries(
        CONFLICT, min_count=2, PERSONALITY_GENERATION=str(generation), _PID=str(daemon.pid)
    )
    by_path = {e["PERSONALITY_PATH"]: e for e in entries}
    tool = by_path["/usr/bin/tool"]
    assert tool["PERSONALITY_WINNER"] == "webs"
    assert field_list(tool, "PERSONALITY_SHADOWED") == ["datasci"]
    assert tool["PERSONALITY_IDENTICAL"] == "0"
    assert tool["PERSONALITY_HIERARCHY"] == "/usr"
    assert tool["PRIORITY"] == "4"
    assert tool["MESSAGE"].startswith("Conflict on /usr/bin/tool: 'webs' (attached last) shadows")
    assert by_path["/usr/share/doc/README"]["PERSONALITY_IDENTICAL"] == "1"
    summary = journal.entries(
        SUMMARY, PERSONALITY_GENERATION=str(generation), _PID=str(daemon.pid)
    )[0]
    assert summary["PERSONALITY_ATTACHED"] == "datasci webs"
    assert summary["PERSONALITY_CONFLICTS"] == "2"
    assert summary["PRIORITY"] == "5"
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert report["generation"] == generation
    assert {c["path"] for c in report["conflicts"]} == {"/usr/bin/tool", "/usr/share/doc/README"}


def test_detach_restores_base_and_switch_is_one_generation(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    loop_devices.attach(image("one", {"usr/bin/base-tool": b"override\n", "usr/bin/one": "1"}))
    loop_devices.attach(image("two", {"usr/bin/two": "2"}))
    loop_devices.attach(image("three", {"usr/bin/three": "3"}))
    daemon.start()
    before = our_mounts(sandbox_root)

    first = ok(daemon.request({"action": "attach", "personality": "one"}))
    assert read(sandbox_root, "usr/bin/base-tool") == b"override\n"
    switched = ok(daemon.request({"action": "switch", "personalities": ["two", "three"]}))
    assert switched["generation"] == first["generation"] + 1
    assert switched["attached"] == ["two", "three"]
    assert not (sandbox_root / "usr/bin/one").exists()
    assert read(sandbox_root, "usr/bin/three") == b"3"
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES

    ok(daemon.request({"action": "detach", "personality": "two"}))
    ok(daemon.request({"action": "detach", "personality": "three"}))
    assert read(sandbox_root, "usr/bin/base-tool") == BASE_TOOL_BYTES
    assert not (sandbox_root / "usr/bin/three").exists()
    assert stacked_overlays(sandbox_root, "/usr") == []
    # Only the drained volume mounts are gone; what remains is what was there before.
    deadline = time.monotonic() + 120
    while our_mounts(sandbox_root) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert our_mounts(sandbox_root) == before
    gone = ok(daemon.request({"action": "detach", "personality": "two"}))
    assert gone["changed"] is False


def test_request_waits_for_a_volume_that_appears_later(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    late = image("late", {"usr/bin/late": b"arrived\n"})
    daemon.start()
    spool = daemon.spool_dir
    drop(spool, "wait", {"action": "attach", "personality": "late", "timeout": 600})
    wait_for(lambda: "event=spool_request file=wait.json" in daemon.log_text(), daemon)
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


# Reads PATH until STOP exists; appends to SEEN each change of what it reads, as it happens;
# prints its count of reads and of errors (a failed read, or content not in EXPECTED).
READER = r"""
import os, sys
path, expected, stop, seen = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
errors = reads = 0
last = None
with open(seen, "w") as out:
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read().decode()
        except OSError as exc:
            data = f"error: {exc}"
        if data not in expected:
            errors += 1
        reads += 1
        if data != last:
            out.write(data + "\n")
            out.flush()
            last = data
print(reads, errors)
"""


def test_readers_never_see_a_missing_file_during_switches(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path, tmp_path: Path
) -> None:
    loop_devices.attach(image("blue", {"usr/bin/shared": "blue"}))
    loop_devices.attach(image("green", {"usr/bin/shared": "green"}))
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "blue"}))
    stop = tmp_path / "stop-reader"
    seen = tmp_path / "reader-saw"
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            READER,
            str(sandbox_root / "usr/bin/shared"),
            "blue,green",
            str(stop),
            str(seen),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    def reader_saw(content: str) -> Callable[[], bool]:
        def saw() -> bool:
            lines = seen.read_text().splitlines() if seen.exists() else []
            return bool(lines) and lines[-1] == content

        return saw

    try:
        # Reading before the first switch, and the content of each switch read before the
        # next one: the reads went on across every change of the stack.
        wait_for(reader_saw("blue"), daemon)
        for i in range(50):
            colour = "green" if i % 2 == 0 else "blue"
            ok(daemon.request({"action": "switch", "personalities": [colour]}))
            wait_for(reader_saw(colour), daemon)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    reads, errors = map(int, out.split())
    assert errors == 0, f"{errors} of {reads} reads failed or saw other content: {seen.read_text()}"


def test_failed_switch_rolls_back_and_is_journalled(
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
    journal: JournalReader,
) -> None:
    loop_devices.attach(image("stable", {"usr/bin/tool": b"stable\n"}))
    loop_devices.attach(image("good", {"usr/bin/good": b"good\n"}))
    broken_image = image("broken", {"usr/bin/tool": b"broken\n"})
    broken = loop_devices.attach(broken_image)
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "stable"}))
    before = our_mounts(sandbox_root)

    # The volume was recognised; now its medium goes bad before it is mounted for real.
    with open(broken_image, "r+b") as f:
        f.write(b"\0" * 4096)
    subprocess.run(["blockdev", "--flushbufs", broken], check=True)
    result = daemon.request({"action": "switch", "personalities": ["good", "broken"]})

    assert (result["_dir"], result["code"]) == ("failed", "mount-failed")
    assert "broken" in result["message"]
    assert result["attached"] == ["stable"]
    assert read(sandbox_root, "usr/bin/tool") == b"stable\n"
    assert not (sandbox_root / "usr/bin/good").exists()
    assert our_mounts(sandbox_root) == before
    failure = journal.entries(FAILED, _PID=str(daemon.pid))[0]
    assert "broken" in failure["PERSONALITY_REASON"]
    assert "switch" in failure["PERSONALITY_REQUESTED"]
    assert failure["PRIORITY"] == "3"
    # The daemon keeps serving.
    ok(daemon.request({"action": "attach", "personality": "good"}))
    assert read(sandbox_root, "usr/bin/good") == b"good\n"


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
    wait_for(lambda: read(sandbox_root, "usr/bin/tool") == b"lower\n", daemon)
    assert not (sandbox_root / "usr/bin/only-upper").exists()
    states = json.loads((daemon.state_dir / "state.json").read_text())
    assert [e["name"] for e in states["desired"]] == ["lower", "upper"]

    loop_devices.attach(top_img)
    wait_for(lambda: read(sandbox_root, "usr/bin/tool") == b"upper\n", daemon)
    assert read(sandbox_root, "usr/bin/only-upper") == b"u"


def wait_for(condition: Callable[[], bool], daemon: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, daemon.log_text()[-4000:]
        time.sleep(0.1)


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
        wait_for(answer.exists, daemon)
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
    assert read(sandbox_root, "etc/base.conf") == BASE_CONF.encode()  # the base itself is untouched
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
    wait_for(lambda: (spool / "done/q2.result.json").exists(), daemon)
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
    for name in ("big", "link", "fifo", "nobody"):
        wait_for((spool / f"failed/{name}.result.json").exists, daemon)
        result = json.loads((spool / f"failed/{name}.result.json").read_text())
        assert result["code"] == "invalid-request", result
    assert (spool / "failed/link.json").is_symlink()
    assert ok(daemon.request({"action": "attach", "personality": "svc"}))["changed"] is True


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


@pytest.mark.parametrize(
    "settings",
    [{"overlay_api": "legacy"}, {"swap": "replace"}, {"overlay_api": "legacy", "swap": "replace"}],
)
def test_fallback_mount_paths_work(
    settings: dict[str, str],
    daemon: Daemon,
    loop_devices: LoopDevices,
    image: Images,
    sandbox_root: Path,
) -> None:
    loop_devices.attach(image("fa", {"usr/bin/tool": "fa"}))
    loop_devices.attach(image("fb", {"usr/bin/tool": "fb"}))
    daemon.update_config({"stack": settings})
    daemon.start()
    log = daemon.log_text()
    assert "mount_fallback" in log
    ok(daemon.request({"action": "attach", "personality": "fa"}))
    ok(daemon.request({"action": "attach", "personality": "fb"}))
    assert read(sandbox_root, "usr/bin/tool") == b"fb"
    ok(daemon.request({"action": "switch", "personalities": ["fb", "fa"]}))
    assert read(sandbox_root, "usr/bin/tool") == b"fa"
    assert len(stacked_overlays(sandbox_root, "/usr")) == 1
    daemon.restart()
    assert read(sandbox_root, "usr/bin/tool") == b"fa"
    assert len(stacked_overlays(sandbox_root, "/usr")) == 1


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


def test_conflict_entries_are_capped_at_1000_and_summary_counts_the_rest(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, journal: JournalReader
) -> None:
    many = {f"usr/share/many/f{i:04}": f"{i}" for i in range(1050)}
    loop_devices.attach(image("many-a", many))
    loop_devices.attach(image("many-b", {k: v + "b" for k, v in many.items()}))
    daemon.start()
    result = ok(daemon.request({"action": "switch", "personalities": ["many-a", "many-b"]}))
    generation = str(result["generation"])
    summary = journal.entries(SUMMARY, _PID=str(daemon.pid), PERSONALITY_GENERATION=generation)
    assert summary[0]["PERSONALITY_CONFLICTS"] == "1050"
    assert "50 not logged singly" in summary[0]["MESSAGE"]
    singles = journal.entries(
        CONFLICT, min_count=1000, _PID=str(daemon.pid), PERSONALITY_GENERATION=generation
    )
    assert len(singles) == 1000
    report = json.loads((daemon.runtime_dir / "conflicts.json").read_text())
    assert len(report["conflicts"]) == 1050  # the file has them all


def test_sigterm_keeps_waiting_spool_request_for_the_next_start(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    later = image("after-restart", {"usr/bin/after": b"restarted\n"})
    daemon.start()
    spool = daemon.spool_dir
    drop(spool, "waiting", {"action": "attach", "personality": "after-restart", "timeout": 600})
    wait_for(lambda: "event=spool_request file=waiting.json" in daemon.log_text(), daemon)
    assert daemon.stop() == 0
    assert (spool / "waiting.json").exists()  # not lost, not answered
    assert not (spool / "failed/waiting.result.json").exists()
    loop_devices.attach(later)
    daemon.start()
    wait_for((spool / "done/waiting.result.json").exists, daemon)
    assert read(sandbox_root, "usr/bin/after") == b"restarted\n"
