"""Trials, rollback and the history through the real daemon, without a service manager (the
checks of units run under systemd in tests/system/test_trials.py): manual confirmation,
the deadline, Rollback during a trial, kill -9 during a trial, the history and Rollback(0)
and Rollback(N), data rollback refused off btrfs, and the journal entries.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from sandbox_view import our_mounts, read, stacked_overlays, wait_until
from served_daemon import Images, Serve, listing

from testkit.daemon import Daemon
from testkit.dbus import call_error, call_ok
from testkit.images import build_writable_image
from testkit.journal import JournalReader
from testkit.loops import LoopDevices
from testkit.spool import drop

TRIAL = "ff8126e592204485bd2ed37326e8cab3"
CONFIRMED = "cf7ea7a0ed7d4c18bfb93a266a8add35"
ROLLED_BACK = "5beb5094764f4b60a639610dd1185344"
ERROR = "org.personalityd.personality1.Error."


def three(loop_devices: LoopDevices, image: Images) -> None:
    for name in ("a", "b", "c"):
        loop_devices.attach(image(name, {"usr/bin/tool": name, f"usr/share/{name}": name}))


async def generations(client: MessageBus) -> list[tuple[int, list[str], int, str, str]]:
    (rows,) = await call_ok(client, "ListGenerations", "")
    return [tuple(row) for row in rows]


def options(**values: Any) -> dict[str, Variant]:
    signatures = {"confirm": "u", "confirm_mode": "s", "data": "b", "timeout": "u", "force": "b"}
    return {k: Variant(signatures[k], v) for k, v in values.items()}


def spool_result(daemon: Daemon, stem: str) -> dict[str, Any]:
    for where in ("done", "failed"):
        path = daemon.spool_dir / where / f"{stem}.result.json"
        if path.exists():
            result: dict[str, Any] = json.loads(path.read_text())
            result["_dir"] = where
            return result
    raise AssertionError(f"no result for {stem}")


def has_result(daemon: Daemon, stem: str) -> bool:
    return any((daemon.spool_dir / d / f"{stem}.result.json").exists() for d in ("done", "failed"))


def wait_for_trial(daemon: Daemon, generation: int) -> None:
    wait_until(lambda: f"event=trial_started generation={generation}" in daemon.log_text(), daemon)


async def test_manual_trial_is_confirmed_by_confirm(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images,
    client: MessageBus, journal: JournalReader,
) -> None:  # fmt: skip
    three(loop_devices, image)
    serve(daemon)
    assert await call_ok(client, "Switch", "asa{sv}", ["a"], {}) == [True]
    manual = options(confirm=120, confirm_mode="manual")
    switch = asyncio.ensure_future(call_ok(client, "Switch", "asa{sv}", ["a", "b"], manual))
    await asyncio.to_thread(wait_for_trial, daemon, 2)
    assert read(daemon.root, "usr/bin/tool") == b"b"
    assert not switch.done()  # the answer waits for the end of the trial
    assert (await generations(client))[-1][3] == "trial"
    # Other changes are Busy meanwhile; a Confirm of another generation is refused.
    name, message = await call_error(client, "Attach", "sa{sv}", "c", {})
    assert name == ERROR + "Busy" and "generation 2 is on trial" in message, message
    name, message = await call_error(client, "Confirm", "t", 7)
    assert name == "org.freedesktop.DBus.Error.InvalidArgs", message
    assert await call_ok(client, "Confirm", "t", 2) == []
    assert await asyncio.wait_for(switch, 60) == [True]
    rows = await generations(client)
    assert [(g, names, status) for g, names, _, status, _ in rows[-2:]] == [
        (1, ["a"], "confirmed"),
        (2, ["a", "b"], "confirmed"),
    ]
    assert rows[-1][4] == "dbus"
    started = journal.entries(TRIAL, PERSONALITY_GENERATION=2)[0]
    assert int(started["PERSONALITY_DEADLINE"]) > time.time() * 1e6
    journal.entries(CONFIRMED, PERSONALITY_GENERATION=2)
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["trial"] is None


async def test_manual_trial_missing_its_deadline_is_rolled_back(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images,
    client: MessageBus, journal: JournalReader,
) -> None:  # fmt: skip
    three(loop_devices, image)
    serve(daemon)
    await call_ok(client, "Switch", "asa{sv}", ["a"], {})
    before = our_mounts(daemon.root)
    name, message = await call_error(
        client, "Switch", "asa{sv}", ["a", "b"], options(confirm=2, confirm_mode="manual")
    )
    assert name == ERROR + "RolledBack", message
    assert message == (
        "generation 2 was rolled back (deadline); generation 3 has the stack of generation 1"
    )
    assert read(daemon.root, "usr/bin/tool") == b"a"
    assert not (daemon.root / "usr/share/b").exists()
    assert [m[0] for m in our_mounts(daemon.root)] == [m[0] for m in before]
    rows = await generations(client)
    assert [(g, names, status, cause) for g, names, _, status, cause in rows[-3:]] == [
        (1, ["a"], "confirmed", "dbus"),
        (2, ["a", "b"], "rolled-back", "dbus"),
        (3, ["a"], "confirmed", "rollback"),
    ]
    entry = journal.entries(ROLLED_BACK, PERSONALITY_GENERATION=2)[0]
    assert (entry["PERSONALITY_ROLLED_BACK_TO"], entry["PERSONALITY_NEW_GENERATION"]) == ("1", "3")
    assert entry["PERSONALITY_REASON"] == "deadline"


async def test_automatic_trial_without_units_is_confirmed_and_spool_answers(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images, client: MessageBus,
) -> None:  # fmt: skip
    three(loop_devices, image)
    serve(daemon)
    answer = daemon.request({"action": "switch", "personalities": ["a", "c"], "confirm": 30})
    assert (answer["_dir"], answer["status"], answer["generation"]) == ("done", "ok", 1)
    assert (await generations(client))[-1][3:] == ("confirmed", "spool")
    # A manual trial in the spool, rolled back by a Rollback through the spool.
    drop(daemon.spool_dir, "try", {"action": "switch", "personalities": ["b"], "confirm": 300,
                                   "confirm_mode": "manual"})  # fmt: skip
    await asyncio.to_thread(wait_for_trial, daemon, 2)
    busy = daemon.request({"action": "detach", "personality": "a"})
    assert (busy["_dir"], busy["code"]) == ("failed", "busy")
    back = daemon.request({"action": "rollback", "generation": 1})
    assert (back["_dir"], back["status"], back["generation"]) == ("done", "ok", 3)
    await asyncio.to_thread(wait_until, lambda: has_result(daemon, "try"), daemon)
    tried = spool_result(daemon, "try")
    assert (tried["_dir"], tried["code"]) == ("failed", "rolled-back")
    assert "rolled back by request" in tried["message"]
    assert read(daemon.root, "usr/bin/tool") == b"c"
    unknown = daemon.request({"action": "rollback", "generation": 99})
    assert (unknown["_dir"], unknown["code"]) == ("failed", "invalid-request")
    assert "generation 99 is not in the history" in unknown["message"]


async def test_rollback_over_a_pruned_history(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images, client: MessageBus,
) -> None:  # fmt: skip
    three(loop_devices, image)
    serve(daemon)
    stacks = [["a"], ["b"], ["a", "b"], ["c"], ["b", "c"]]
    for i in range(20):
        assert await call_ok(client, "Switch", "asa{sv}", stacks[i % len(stacks)], {}) == [True]
    rows = await generations(client)
    assert [g for g, *_ in rows] == list(range(5, 21))  # 16 kept, the oldest went first
    # Rollback(0): the confirmed generation before the current one; twice: back again.
    assert await call_ok(client, "Rollback", "ta{sv}", 0, {}) == [21]
    assert (await generations(client))[-1][1] == stacks[18 % 5]
    assert await call_ok(client, "Rollback", "ta{sv}", 0, {}) == [22]
    assert (await generations(client))[-1][1] == stacks[19 % 5]
    assert await call_ok(client, "Rollback", "ta{sv}", 8, {}) == [23]
    rows = await generations(client)
    assert rows[-1][1] == stacks[7 % 5] and rows[-1][4] == "rollback"
    assert read(daemon.root, "usr/bin/tool") == stacks[7 % 5][-1].encode()
    name, message = await call_error(client, "Rollback", "ta{sv}", 2, {})
    assert name == "org.freedesktop.DBus.Error.InvalidArgs" and "not in the history" in message
    # Data rollback needs btrfs; without it nothing changes.
    name, message = await call_error(client, "Rollback", "ta{sv}", 0, options(data=True))
    assert name == ERROR + "NotSupported", message
    assert (await generations(client))[-1][0] == 23


def test_kill9_during_a_trial_returns_to_the_confirmed_stack(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path,
    journal: JournalReader,
) -> None:  # fmt: skip
    three(loop_devices, image)
    loop_devices.attach(build_writable_image(sandbox_root.parent), read_only=False)
    daemon.start()
    confirmed = ["a"]
    answer = daemon.request({"action": "switch", "personalities": confirmed})
    assert answer["status"] == "ok"
    after_confirmed = our_mounts(sandbox_root)
    rng = random.Random(12)
    for round_ in range(5):
        target = rng.choice([["a", "b"], ["c"], ["b", "c"]])
        generation = daemon_generation(daemon)
        body = {"action": "switch", "personalities": target, "confirm": 600,
                "confirm_mode": "manual"}  # fmt: skip
        drop(daemon.spool_dir, f"t{round_}", body)
        wait_for_trial(daemon, generation + 1)
        time.sleep(rng.uniform(0, 0.3))
        daemon.kill9()
        daemon.start()
        wait_until(lambda r=round_: has_result(daemon, f"t{r}"), daemon)  # type: ignore[misc]
        result = spool_result(daemon, f"t{round_}")
        assert read(sandbox_root, "usr/bin/tool") == b"a", daemon.log_text()[-3000:]
        assert not (sandbox_root / "usr/share/b").exists()
        volumes = sorted(p.name for p in (sandbox_root / "opt/personality").iterdir())
        assert volumes == confirmed
        for hierarchy in ("/usr", "/etc"):
            assert len(stacked_overlays(sandbox_root, hierarchy)) == 1
        assert [m[0] for m in our_mounts(sandbox_root)] == [m[0] for m in after_confirmed]
        state = json.loads((daemon.state_dir / "state.json").read_text())
        assert state["trial"] is None
        assert [e["name"] for e in state["desired"]] == confirmed
        if result["_dir"] == "failed":  # the trial had begun: its request gets the rollback
            assert result["code"] == "rolled-back", result
            assert "not confirmed before the daemon stopped" in result["message"]
            assert state["history"][-2]["status"] == "rolled-back"
        else:  # killed before the request was read: it was handled again, as a new trial,
            raise AssertionError(f"a trial request answered ok without a Confirm: {result}")
    # A clean stop (SIGTERM) during a trial: the same at the next start.
    generation = daemon_generation(daemon)
    drop(daemon.spool_dir, "term", {"action": "switch", "personalities": ["c"], "confirm": 600,
                                    "confirm_mode": "manual"})  # fmt: skip
    wait_for_trial(daemon, generation + 1)
    assert daemon.stop() == 0
    assert not has_result(daemon, "term")  # left in the spool for the next start
    daemon.start()
    assert read(sandbox_root, "usr/bin/tool") == b"a"
    wait_until(lambda: has_result(daemon, "term"), daemon)
    assert spool_result(daemon, "term")["code"] == "rolled-back"
    reason = "not confirmed before the daemon stopped"
    assert len(journal.entries(ROLLED_BACK, min_count=6, PERSONALITY_REASON=reason)) >= 6


def daemon_generation(daemon: Daemon) -> int:
    state = json.loads((daemon.state_dir / "state.json").read_text())
    generation: int = state["generation"]
    return generation


async def test_data_rollback_on_btrfs(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images,
    client: MessageBus, sandbox_root: Path,
) -> None:  # fmt: skip
    three(loop_devices, image)
    loop_devices.attach(
        build_writable_image(sandbox_root.parent, fs_type="btrfs"), read_only=False
    )
    serve(daemon)
    await asyncio.to_thread(wait_until, lambda: bool(daemon_writable(daemon)), daemon)
    await call_ok(client, "Switch", "asa{sv}", ["a"], {})
    (sandbox_root / "etc/before").write_text("before\n")
    confirmed = daemon_generation(daemon)
    manual = options(confirm=300, confirm_mode="manual")
    switch = asyncio.ensure_future(call_error(client, "Switch", "asa{sv}", ["a", "b"], manual))
    await asyncio.to_thread(wait_for_trial, daemon, confirmed + 1)
    (sandbox_root / "etc/during").write_text("during\n")
    (sandbox_root / "etc/before").write_text("changed during the trial\n")
    # Rollback during the trial: it ends the trial, and the upper returns with it.
    assert await call_ok(client, "Rollback", "ta{sv}", 0, {}) == [confirmed + 2]
    name, message = await asyncio.wait_for(switch, 60)
    assert name == ERROR + "RolledBack" and "rolled back by request" in message
    assert not (sandbox_root / "etc/during").exists()
    assert (sandbox_root / "etc/before").read_text() == "before\n"
    writable = daemon.runtime_dir / "writable"
    (tried,) = [g for g, _, _, status, _ in await generations(client) if status == "rolled-back"]
    kept = writable / f"rolled-back/{tried}"
    assert (kept / "upper/_etc/during").read_text() == "during\n"
    assert (kept / "upper/_etc/before").read_text() == "changed during the trial\n"
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["upper_data"] and state["trial"] is None
    # An explicit data rollback of a confirmed generation: the writes since are kept too.
    (sandbox_root / "etc/later").write_text("later\n")
    now = daemon_generation(daemon)
    assert await call_ok(client, "Switch", "asa{sv}", ["c"], {}) == [True]
    (sandbox_root / "etc/later").write_text("later, under c\n")
    assert await call_ok(client, "Rollback", "ta{sv}", now, options(data=True)) == [now + 2]
    assert (sandbox_root / "etc/later").read_text() == "later\n"
    assert read(sandbox_root, "usr/bin/tool") == b"a"
    later = writable / f"rolled-back/{now + 1}/upper/_etc/later"
    assert later.read_text() == "later, under c\n"
    # The current generation has no kept state yet (it is kept when it is left).
    name, message = await call_error(client, "Rollback", "ta{sv}", now + 2, options(data=True))
    assert name == "org.freedesktop.DBus.Error.InvalidArgs" and "data is kept" in message
    snapshots = sorted(int(p.name) for p in (writable / "snapshots").iterdir())
    assert snapshots and set(snapshots) <= {g for g, *_ in await generations(client)}


def daemon_writable(daemon: Daemon) -> str:
    """The writable device the daemon uses (from its log), or "" before it found one."""
    for line in daemon.log_text().splitlines():
        if "event=writable_mounted" in line:
            return line
    return ""


def test_kill9_during_a_trial_on_btrfs_returns_the_data_too(
    daemon: Daemon, loop_devices: LoopDevices, image: Images, sandbox_root: Path
) -> None:
    three(loop_devices, image)
    loop_devices.attach(
        build_writable_image(sandbox_root.parent, fs_type="btrfs"), read_only=False
    )
    daemon.start()
    wait_until(lambda: bool(daemon_writable(daemon)), daemon)
    assert daemon.request({"action": "switch", "personalities": ["a"]})["status"] == "ok"
    (sandbox_root / "etc/before").write_text("before\n")
    generation = daemon_generation(daemon)
    body = {"action": "switch", "personalities": ["b"], "confirm": 600, "confirm_mode": "manual"}
    drop(daemon.spool_dir, "crash", body)
    wait_for_trial(daemon, generation + 1)
    (sandbox_root / "etc/during").write_text("during\n")
    daemon.kill9()
    daemon.start()
    assert read(sandbox_root, "usr/bin/tool") == b"a"
    assert (sandbox_root / "etc/before").read_text() == "before\n"
    assert not (sandbox_root / "etc/during").exists()
    kept = daemon.runtime_dir / f"writable/rolled-back/{generation + 1}/upper/_etc/during"
    assert kept.read_text() == "during\n"
    wait_until(lambda: has_result(daemon, "crash"), daemon)
    assert spool_result(daemon, "crash")["code"] == "rolled-back"


async def test_rollback_to_a_generation_whose_volume_is_gone(
    serve: Serve, daemon: Daemon, loop_devices: LoopDevices, image: Images, client: MessageBus,
) -> None:  # fmt: skip
    a = image("a", {"usr/bin/tool": "a"})
    loop_devices.attach(a)
    c = loop_devices.attach(image("c", {"usr/bin/tool": "c"}))
    serve(daemon)
    await call_ok(client, "Switch", "asa{sv}", ["a", "c"], {})
    with_c = daemon_generation(daemon)
    await call_ok(client, "Switch", "asa{sv}", ["a"], {})
    loop_devices.yank(c)
    deadline = time.monotonic() + 120
    while "c" in await listing(client):
        assert time.monotonic() < deadline, await listing(client)
        await asyncio.sleep(0.1)
    name, message = await call_error(client, "Rollback", "ta{sv}", with_c, {})
    assert name == ERROR + "NoSuchPersonality" and "'c'" in message, message
    # With a timeout, the volume may come back meanwhile.
    back = asyncio.ensure_future(
        call_ok(client, "Rollback", "ta{sv}", with_c, options(timeout=120))
    )
    await asyncio.sleep(0.5)
    assert not back.done()
    loop_devices.attach(image("c", {"usr/bin/tool": "c"}))
    assert await asyncio.wait_for(back, 120) == [daemon_generation(daemon)]
    assert read(daemon.root, "usr/bin/tool") == b"c"
