"""personalityctl's history, rollback, confirm and --confirm against the real daemon, as an
operator runs them (docs/trials.md). The sandbox has no service manager, so an automatic
trial is confirmed at once; a manual one waits for `personalityctl confirm` or its deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from bus_clients import Result
from served_daemon import Serve, Trio, no_traceback

from testkit.daemon import Daemon
from testkit.journal import JournalReader
from testkit.paths import REPO
from testkit.polling import wait_for

CTL = (sys.executable, "-m", "personalityd.client.cli")
PREFIX = "personalityctl: "
ERR = "org.personalityd.personality1.Error."
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
TRIAL_STARTED = "ff8126e592204485bd2ed37326e8cab3"
TRIAL_CONFIRMED = "cf7ea7a0ed7d4c18bfb93a266a8add35"
ROLLED_BACK = "5beb5094764f4b60a639610dd1185344"


def env() -> dict[str, str]:
    values = dict(os.environ)
    values["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "daemon"), values.get("PYTHONPATH")])
    )
    return values


def ctl(*argv: str, timeout: float = 180) -> Result:
    proc = subprocess.run(
        [*CTL, *argv], capture_output=True, text=True, env=env(), timeout=timeout,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ctl_ok(*argv: str) -> str:
    result = ctl(*argv)
    assert (result.rc, result.err) == (0, ""), (argv, result)
    return result.out


def ctl_fails(*argv: str) -> str:
    """Exit 1, one line on stderr (returned without the prefix), nothing on stdout."""
    result = ctl(*argv)
    assert (result.rc, result.out) == (1, ""), (argv, result)
    line = result.err_line()
    assert line.startswith(PREFIX), line
    return line.removeprefix(PREFIX)


def ctl_json_fails(*argv: str) -> dict[str, Any]:
    """Exit 1 with --json: the error object on stdout, and its message on stderr."""
    result = ctl(*argv, "--json")
    assert result.rc == 1, (argv, result)
    data: dict[str, Any] = json.loads(result.out)
    assert set(data) == {"error", "message"}, data
    assert result.err_line().startswith(PREFIX)
    return data


def background(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CTL, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Result(proc.returncode, out, err)


def history() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(ctl_ok("history", "--json"))
    return data


def entry(generation: int) -> dict[str, Any]:
    return next(g for g in history() if g["generation"] == generation)


def generation() -> int:
    return int(json.loads(ctl_ok("status", "--json"))["generation"])


def wait_for_trial() -> int:
    """The generation on trial, once `status` shows one."""
    wait_for(
        lambda: json.loads(ctl_ok("status", "--json"))["trial"] is not None,
        what="a generation on trial",
    )
    trial = json.loads(ctl_ok("status", "--json"))["trial"]
    assert isinstance(trial, int)
    return trial


def test_history_and_rollback(serve: Serve, daemon: Daemon, trio: Trio) -> None:
    serve(daemon)
    start = generation()
    assert ctl_ok("switch", "web") == "Switched to: web.\n"
    assert ctl_ok("switch", "tools", "web") == "Switched to: tools web.\n"
    assert ctl_ok("switch", "tools") == "Switched to: tools.\n"
    g1, g2, g3 = start + 1, start + 2, start + 3
    assert generation() == g3

    lines = ctl_ok("history").splitlines()
    assert lines[0].split() == ["GENERATION", "TIME", "STATUS", "CAUSE", "DESIRED"]
    rows = {line.split()[0]: line for line in lines[1:] if line and line[0].isdigit()}
    assert rows[str(g1)].split()[3:] == ["confirmed", "dbus", "web"]
    assert rows[str(g2)].split()[3:] == ["confirmed", "dbus", "tools", "web"]
    assert rows[str(g3)].split()[1:2] == ["(current)"]
    assert rows[str(g3)].split()[4:] == ["confirmed", "dbus", "tools"]
    assert lines[-1].endswith("kept.")

    kept = history()
    assert [g["generation"] for g in kept][-3:] == [g1, g2, g3]
    assert [g["current"] for g in kept][-3:] == [False, False, True]
    assert kept[-1]["desired"] == ["tools"]
    assert kept[-1]["time"][:4].isdigit() and kept[-1]["realtime_usec"] > 0
    assert set(kept[-1]) == {
        "generation", "desired", "time", "realtime_usec", "status", "cause", "current",
    }  # fmt: skip

    # Rollback(0): the newest confirmed generation before the current one; twice flips back.
    assert (
        ctl_ok("rollback")
        == f"Rolled back to generation {g2}'s stack as generation {g3 + 1}: tools web\n"
    )
    assert (
        ctl_ok("rollback")
        == f"Rolled back to generation {g3}'s stack as generation {g3 + 2}: tools\n"
    )
    assert entry(g3 + 2)["cause"] == "rollback"
    # Rollback(N), with --json.
    data = json.loads(ctl_ok("rollback", str(g1), "--json"))
    assert data == {
        "changed": True,
        "generation": g3 + 3,
        "attached": ["web"],
        "conflicts": 0,
        "rolled_back_to": g1,
    }
    assert entry(g3 + 3) | {"time": "", "realtime_usec": 0} == {
        "generation": g3 + 3, "desired": ["web"], "time": "", "realtime_usec": 0,
        "status": "confirmed", "cause": "rollback", "current": True,
    }  # fmt: skip

    # An unknown generation: InvalidArgs, exit 1, nothing changed.
    assert ctl_fails("rollback", "9999").startswith("generation 9999 is not in the history")
    failed = ctl_json_fails("rollback", "9999")
    assert failed["error"] == INVALID_ARGS
    assert failed["message"].startswith("generation 9999 is not in the history")
    # --data needs btrfs: NotSupported, nothing changed.
    failed = ctl_json_fails("rollback", str(g2), "--data")
    assert failed["error"] == ERR + "NotSupported"
    # Nothing on trial: nothing to confirm.
    assert "nothing to confirm" in ctl_fails("confirm")
    assert generation() == g3 + 3
    no_traceback(daemon)


def test_manual_trial_confirmed(
    serve: Serve, daemon: Daemon, trio: Trio, journal: JournalReader
) -> None:
    serve(daemon)
    before = generation()
    switching = background("switch", "tools", "--confirm", "120", "--confirm-mode", "manual")
    try:
        trial = wait_for_trial()
        assert trial == before + 1
        assert switching.poll() is None  # the answer waits for the end of the trial
        status = ctl_ok("status")
        assert f"Trial: generation {trial} is on trial: 'personalityctl confirm' keeps it" in (
            " ".join(status.split())
        ), status
        assert entry(trial)["status"] == "trial"
        # A change during a trial is refused.
        busy = ctl_json_fails("attach", "web")
        assert busy["error"] == ERR + "Busy"
        (started,) = journal.entries(TRIAL_STARTED, PERSONALITY_GENERATION=trial)
        assert int(started["PERSONALITY_DEADLINE"]) > time.time() * 1_000_000
        confirmed = json.loads(ctl_ok("confirm", "--json"))
        assert confirmed == {
            "changed": True,
            "generation": trial,
            "attached": ["tools"],
            "conflicts": 0,
            "confirmed": trial,
            "status": "confirmed",
        }
    finally:
        result = finish(switching)
    assert (result.rc, result.out, result.err) == (0, "Switched to: tools.\n", "")
    assert entry(trial)["status"] == "confirmed"
    journal.entries(TRIAL_CONFIRMED, PERSONALITY_GENERATION=trial)
    assert json.loads(ctl_ok("status", "--json"))["trial"] is None
    assert "Trial" not in ctl_ok("status")

    # confirm N names the trial; an automatic trial with --json is confirmed at once here.
    switching = background("attach", "web", "--confirm", "120", "--confirm-mode", "manual")
    try:
        trial = wait_for_trial()
        assert "is not on trial" in ctl_fails("confirm", str(trial - 1))
        assert ctl_ok("confirm", str(trial)) == f"Confirmed generation {trial}.\n"
    finally:
        result = finish(switching)
    assert (result.rc, result.out) == (0, "Attached web.\n"), result
    data = json.loads(ctl_ok("detach", "web", "--confirm", "30", "--json"))
    assert data == {"changed": True, "generation": trial + 1, "attached": ["tools"], "conflicts": 0}
    assert entry(trial + 1)["status"] == "confirmed"
    no_traceback(daemon)


def test_manual_trial_left_to_its_deadline(
    serve: Serve, daemon: Daemon, trio: Trio, journal: JournalReader
) -> None:
    serve(daemon)
    assert ctl_ok("switch", "web") == "Switched to: web.\n"
    confirmed = generation()
    started = time.monotonic()
    result = ctl("switch", "tools", "--confirm", "2", "--confirm-mode", "manual")
    assert time.monotonic() - started >= 2
    assert (result.rc, result.out) == (1, ""), result
    trial, new = confirmed + 1, confirmed + 2
    assert result.err_line() == (
        f"{PREFIX}switch tools: generation {trial} was rolled back (deadline); "
        f"generation {new} has the stack of generation {confirmed}"
    )
    (rolled,) = journal.entries(ROLLED_BACK, PERSONALITY_GENERATION=trial)
    assert (rolled["PERSONALITY_ROLLED_BACK_TO"], rolled["PERSONALITY_NEW_GENERATION"]) == (
        str(confirmed), str(new)
    )  # fmt: skip
    assert rolled["PERSONALITY_REASON"] == "deadline"
    assert (entry(trial)["status"], entry(new)["cause"]) == ("rolled-back", "rollback")
    assert entry(new)["desired"] == ["web"] and entry(new)["current"]
    assert json.loads(ctl_ok("status", "--json"))["attached"] == ["web"]

    # The same with --json: the error object on stdout.
    failed = ctl_json_fails("attach", "tools", "--confirm", "1", "--confirm-mode", "manual")
    assert failed["error"] == ERR + "RolledBack"
    assert failed["message"] == (
        f"generation {new + 1} was rolled back (deadline); "
        f"generation {new + 2} has the stack of generation {new}"
    )

    # A rollback during a trial ends it: its caller learns so.
    switching = background("switch", "tools", "--confirm", "120", "--confirm-mode", "manual")
    try:
        trial = wait_for_trial()
        out = ctl_ok("rollback")
        assert out.startswith("Rolled back to generation "), out
    finally:
        result = finish(switching)
    assert result.rc == 1, result
    assert result.err_line().startswith(f"{PREFIX}switch tools: generation {trial} was rolled back")
    assert "rolled back by request" in result.err
    assert json.loads(ctl_ok("status", "--json"))["attached"] == ["web"]
    no_traceback(daemon)
