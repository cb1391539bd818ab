"""Trials under a real systemd: a change whose services or health checks fail, or that is not
confirmed in time, undoes itself; a reboot during a trial comes back to the confirmed stack;
units that require a personality see only confirmed stacks.

One container of its own (the personalities of `trials_machine.py`), booted once; the tests run
in file order and each leaves the stack at [good] with no trial pending. The journal entries of
each outcome are checked where it happens.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from nspawn import LoopDevices, attached_loops, rootfs_tarball, run_dir, wait_until
from trials_machine import (
    CONFIG_DROPIN,
    CONFIRMED_ID,
    READER,
    ROLLED_BACK,
    ROLLED_BACK_ID,
    SHARED,
    TRIAL_ID,
    TRIALS_CONTAINER_KEY,
    Generation,
    Trials,
    build_images,
    options,
    trials_container,
)


@pytest.fixture(scope="module")
def trials_workdir() -> Iterator[Path]:
    with run_dir() as path:
        yield path


@pytest.fixture(scope="module")
def trials_loops() -> Iterator[LoopDevices]:
    with attached_loops() as held:
        yield held


@pytest.fixture(scope="module")
def trials(
    request: pytest.FixtureRequest, deb: Path, trials_workdir: Path, trials_loops: LoopDevices
) -> Generator[Trials, None, None]:
    images = build_images(trials_workdir)
    machine = trials_container(rootfs_tarball(), trials_workdir, deb, images, trials_loops)
    request.config.stash[TRIALS_CONTAINER_KEY] = machine
    try:
        machine.boot()
        t = Trials(machine)
        machine.wait_active("personalityd.service")
        wait_until(lambda: len(machine.personalities()) == len(images), 60, "every volume found")
        # Every test starts from [good], confirmed (no trial: confirm 0).
        assert t.switch(["good"]).error == ""
        machine.wait_active("good.service")
        yield t
    finally:
        machine.cleanup()


@pytest.fixture(autouse=True)
def from_good(trials: Trials) -> None:
    """Each test starts at [good] with no trial pending, whatever the one before left."""
    t = trials
    if any(g.status == "trial" for g in t.generations()):
        t.call("Rollback", "ta{sv}", 0, {})
    if t.attached() != ["good"]:
        assert t.call("Switch", "asa{sv}", ["good"], options(0)).error == ""
    t.c.wait_active("good.service")


def stop_call(call: subprocess.Popen[str]) -> None:
    """End a background call that is still waiting (its pipes closed)."""
    if call.poll() is None:
        call.kill()
    if call.stdout is not None and not call.stdout.closed:
        call.communicate()
    call.wait()


def assert_back_at(t: Trials, stack: list[str], services: list[str]) -> None:
    """The stack, its shared file and its services are those of `stack`, no trial pending."""
    assert t.attached() == stack
    assert t.shared() == stack[-1]
    for unit in services:
        assert t.c.is_active(unit) == "active", unit
    assert [g for g in t.generations() if g.status == "trial"] == []


def newest(t: Trials, desired: list[str], status: str) -> Generation:
    found = [g for g in t.generations() if g.desired == desired and g.status == status]
    assert found, f"no {status} generation with {desired}: {t.generations()}"
    return found[-1]


def assert_trial_journalled(t: Trials, trial: Generation, confirm: int) -> None:
    """One trial entry for `trial`, its deadline `confirm` seconds after it (realtime usec)."""
    (started,) = t.journalled(TRIAL_ID, PERSONALITY_GENERATION=trial.number)
    ahead = (int(started["PERSONALITY_DEADLINE"]) - int(started["__REALTIME_TIMESTAMP"])) / 1e6
    assert confirm - 5 < ahead <= confirm + 0.5, started


def assert_rollback_journalled(
    t: Trials, trial: Generation, restored: Generation, reason: str, confirm: int = 30
) -> Generation:
    """The trial and rollback entries of `trial`; returns the generation the rollback made."""
    made = t.rolled_back_from(trial.number)
    assert (made.status, made.cause, made.desired) == ("confirmed", "rollback", restored.desired)
    assert_trial_journalled(t, trial, confirm)
    (entry,) = t.journalled(ROLLED_BACK_ID, PERSONALITY_GENERATION=trial.number)
    assert entry["PERSONALITY_ROLLED_BACK_TO"] == str(restored.number), entry
    assert entry["PERSONALITY_NEW_GENERATION"] == str(made.number), entry
    assert reason in entry["PERSONALITY_REASON"], entry
    assert t.journal(CONFIRMED_ID, PERSONALITY_GENERATION=trial.number) == []
    return made


# --------------------------------------------------------------------------------------------


def test_failing_service_rolls_the_switch_back(trials: Trials) -> None:
    t = trials
    before = newest(t, ["good"], "confirmed")
    good_pid = t.c.show("good.service", "MainPID")["MainPID"]

    reply = t.switch(["good", "bad"], confirm=30)
    assert reply.error == ROLLED_BACK, reply
    assert "bad.service: exit-code" in reply.message, reply

    assert_back_at(t, ["good"], ["good.service"])
    assert not t.exists("/usr/share/trial/bad")
    assert t.c.is_active("bad.service") != "active"
    # good stayed in the stack throughout: its service was never restarted.
    assert t.c.show("good.service", "MainPID")["MainPID"] == good_pid

    trial = newest(t, ["good", "bad"], "rolled-back")
    assert trial.number > before.number
    made = assert_rollback_journalled(t, trial, before, "bad.service: exit-code")
    assert t.current() == made.number


def test_failing_oneshot_rolls_back_and_restarts_what_left(trials: Trials) -> None:
    t = trials
    assert t.switch(["good", "alt"]).error == ""
    t.c.wait_active("alt.service")
    before = newest(t, ["good", "alt"], "confirmed")

    # alt leaves in the trial (its service stopped before the swap) and comes back with it.
    reply = t.switch(["good", "badoneshot"], confirm=30)
    alt_at_answer = t.c.is_active("alt.service")
    assert reply.error == ROLLED_BACK, reply
    assert "badoneshot.service: exit-code" in reply.message, reply
    assert not t.exists("/usr/share/trial/badoneshot")
    trial = newest(t, ["good", "badoneshot"], "rolled-back")
    assert_rollback_journalled(t, trial, before, "badoneshot.service: exit-code")
    # As after any change, the answer comes once the restored stack's services have started.
    assert alt_at_answer == "active", "alt.service was not started again by the answer"
    assert_back_at(t, ["good", "alt"], ["good.service", "alt.service"])

    assert t.switch(["good"]).error == ""
    t.c.wait_active("alt.service", "inactive", timeout=30)


def test_health_checks(trials: Trials) -> None:
    t = trials
    before = newest(t, ["good"], "confirmed")
    reply = t.switch(["good", "hcfail"], confirm=30)
    assert reply.error == ROLLED_BACK, reply
    assert "hcfail-check.service: exit-code" in reply.message, reply
    assert_back_at(t, ["good"], ["good.service"])
    assert t.c.is_active("hcfail.service") != "active"
    trial = newest(t, ["good", "hcfail"], "rolled-back")
    assert_rollback_journalled(t, trial, before, "hcfail-check.service: exit-code")

    reply = t.switch(["good", "hcok"], confirm=30)
    assert reply.error == "", reply
    assert_back_at(t, ["good", "hcok"], ["good.service", "hcok.service"])
    # The check ran, after the service had started.
    assert t.c.read("/run/hcok-check.ran").strip() == "active"
    confirmed = newest(t, ["good", "hcok"], "confirmed")
    assert t.current() == confirmed.number
    assert_trial_journalled(t, confirmed, 30)
    assert len(t.journalled(CONFIRMED_ID, PERSONALITY_GENERATION=confirmed.number)) == 1
    assert t.journal(ROLLED_BACK_ID, PERSONALITY_GENERATION=confirmed.number) == []

    assert t.switch(["good"]).error == ""


def test_manual_confirmation(trials: Trials) -> None:
    t = trials
    call = t.call_in_background("Switch", "asa{sv}", ["good", "alt"], options(60, "manual"))
    try:
        trial = t.wait_trial()
        assert trial.desired == ["good", "alt"]
        # Its services are up, but a manual trial waits for Confirm (past the settle time).
        t.c.wait_active("alt.service", timeout=30)
        assert t.shared() == "alt"
        time.sleep(2.5)
        assert t.generation(trial.number).status == "trial"
        assert call.poll() is None, "the Switch was answered before Confirm"
        t.busctl("Confirm", "t", str(trial.number))
        reply = t.reply_of(call, timeout=60)
    finally:
        stop_call(call)
    assert reply.error == "", reply
    assert t.generation(trial.number).status == "confirmed"
    assert_back_at(t, ["good", "alt"], ["good.service", "alt.service"])
    assert_trial_journalled(t, trial, 60)
    assert len(t.journalled(CONFIRMED_ID, PERSONALITY_GENERATION=trial.number)) == 1

    # Not confirmed in time: back to [good, alt], alt's service started again.
    before = newest(t, ["good", "alt"], "confirmed")
    reply = t.switch(["good"], confirm=4, mode="manual")
    assert reply.error == ROLLED_BACK, reply
    assert "deadline" in reply.message, reply
    assert_back_at(t, ["good", "alt"], ["good.service", "alt.service"])
    missed = newest(t, ["good"], "rolled-back")
    assert missed.number > before.number
    assert_rollback_journalled(t, missed, before, "deadline", confirm=4)

    assert t.switch(["good"]).error == ""


def test_readers_see_no_error_during_a_rollback(trials: Trials) -> None:
    t = trials
    stop, seen = "/run/trial-reader.stop", "/run/trial-reader.seen"
    t.c.run("rm", "-f", stop, seen)
    reader = subprocess.Popen(
        t.c.command("python3", READER, SHARED, "good,bad", stop, seen),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: t.exists(seen) and t.c.read(seen) == "good\n", 30, "the reader")
        for _ in range(3):
            reply = t.switch(["good", "bad"], confirm=30)
            assert reply.error == ROLLED_BACK, reply
            assert t.shared() == "good"
    finally:
        with contextlib.suppress(Exception):
            t.c.run("touch", stop)
        out, _ = reader.communicate(timeout=60)
    reads, errors = map(int, out.split())
    assert errors == 0, f"{errors} of {reads} reads failed or saw other content"
    # The reader went on through each trial and each rollback.
    assert t.c.read(seen).split() == ["good", "bad"] * 3 + ["good"], t.c.read(seen)


def test_reboot_during_a_trial_comes_back_confirmed(trials: Trials) -> None:
    t = trials
    before = newest(t, ["good"], "confirmed")
    call = t.call_in_background("Switch", "asa{sv}", ["good", "alt"], options(600, "manual"))
    try:
        trial = t.wait_trial()
        wait_until(lambda: t.shared() == "alt", 30, "the trial's stack")
        t.c.poweroff()
    finally:
        stop_call(call)
    t.c.boot()

    assert t.attached() == ["good"]
    assert t.generation(trial.number).status == "rolled-back"
    assert [g for g in t.generations() if g.status == "trial"] == []
    assert t.generations()[-1].desired == ["good"]
    t.c.wait_active("good.service", timeout=30)
    assert t.c.is_active("alt.service") != "active"
    # A unit ordered after the daemon saw the confirmed stack, and started after it was ready.
    assert t.c.read("/run/trial-early.out") == "good\n"
    daemon = t.c.show("personalityd.service", "ActiveEnterTimestampMonotonic")
    early = t.c.show("trial-early.service", "ExecMainStartTimestampMonotonic")
    assert int(early["ExecMainStartTimestampMonotonic"]) >= int(
        daemon["ActiveEnterTimestampMonotonic"]
    )
    assert before.number < trial.number


def configure_confirm_timeout(t: Trials, seconds: int) -> None:
    """`[transactions] confirm_timeout` in the daemon's configuration (restarted for it)."""
    text = f"[transactions]\nconfirm_timeout = {seconds}\n"
    if t.c.run("cat", CONFIG_DROPIN, check=False).stdout == text:
        return
    t.c.run("mkdir", "-p", str(Path(CONFIG_DROPIN).parent))
    t.c.run("sh", "-c", f"printf '%s' '{text}' > {CONFIG_DROPIN}")
    t.c.run("systemctl", "restart", "personalityd.service", timeout=120)
    t.c.wait_active("personalityd.service")


def test_unit_requiring_a_failing_personality_fails_on_its_dependency(trials: Trials) -> None:
    t = trials
    configure_confirm_timeout(t, 20)
    assert t.attached() == ["good"]

    # bad fails its trial (the default one, from the configuration): the stack is back...
    started = t.c.run("systemctl", "start", "needs-bad.service", check=False, timeout=150)
    assert started.returncode != 0, started
    assert t.c.is_active("needs-bad.service") == "inactive"
    assert_back_at(t, ["good"], ["good.service"])
    trial = newest(t, ["good", "bad"], "rolled-back")
    assert_trial_journalled(t, trial, 20)
    (entry,) = t.journalled(ROLLED_BACK_ID, PERSONALITY_GENERATION=trial.number)
    assert "bad.service: exit-code" in entry["PERSONALITY_REASON"], entry
    # ...and personality@bad failed on its own, its ExecStart (personalityctl attach) answered
    # RolledBack, so the start of the unit that requires it failed on that dependency.
    unit = t.c.show("personality@bad.service", "ActiveState", "Result")
    assert unit == {"ActiveState": "failed", "Result": "exit-code"}, unit
    assert "dependency" in started.stderr, started.stderr


def test_unit_requiring_a_personality_starts_once_its_trial_is_confirmed(trials: Trials) -> None:
    t = trials
    configure_confirm_timeout(t, 20)
    t.c.run("systemctl", "start", "needs-alt.service", timeout=150)
    assert t.attached() == ["good", "alt"]
    assert t.c.is_active("personality@alt.service") == "active"
    # needs-alt recorded the history when it started: alt's generation was confirmed by then.
    wait_until(lambda: t.exists("/run/needs-alt.generations"), 10, "needs-alt's record")
    (rows,) = json.loads(t.c.read("/run/needs-alt.generations"))["data"]
    seen = {int(g): (d, s) for g, d, _u, s, _c in rows}
    confirmed = newest(t, ["good", "alt"], "confirmed")
    assert seen.get(confirmed.number) == (["good", "alt"], "confirmed"), seen
    assert_trial_journalled(t, confirmed, 20)
    assert len(t.journalled(CONFIRMED_ID, PERSONALITY_GENERATION=confirmed.number)) == 1
