"""trial_rollback: how long after a failing service's exit the rolled-back stack is live,
beside the time systemd itself takes to report the unit failed.

    python bench/trial_rollback.py [RUNS]      (as root; a built .deb, `make deb`)

The bench harness runs the daemon in a sandbox without a service manager, so this row boots
the system tests' container (Debian 12 with the package, systemd as PID 1; see
tests/system/trials_machine.py) with two personalities: `good`, whose service stays up, and
`bad`, whose service exits 1 after 0.3 s. Each run switches from [good] to [good, bad] with
`confirm` 30 and waits for the RolledBack answer. A listener in the container stamps every
StackChanged signal with CLOCK_MONOTONIC at receipt; systemd gives the service's
ExecMainExitTimestampMonotonic (its exit, as PID 1 saw it) and InactiveEnterTimestampMonotonic
(when the unit entered `failed`), on the same clock. The figure is StackChanged of the
rollback's generation minus the unit's failure; the reference is systemd's own report, the
exit to the failure. The row is merged into bench/results.json and results.md.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))

from nspawn import attached_loops, rootfs_tarball, run_dir, wait_until  # noqa: E402
from trials_machine import (  # noqa: E402
    LISTEN,
    ROLLED_BACK,
    Trials,
    build_images,
    trials_container,
)

from record import Json, measured  # noqa: E402
from report import load, merged, write_results  # noqa: E402

DEFAULT_RUNS = 15
GOAL_MS = 100.0


def newest_deb() -> Path:
    explicit = os.environ.get("PERSONALITYD_DEB")
    if explicit:
        return Path(explicit).resolve()
    debs = sorted((REPO / "build/deb").glob("personalityd_*_all.deb"), key=os.path.getmtime)
    if not debs:
        sys.exit("trial_rollback: no package in build/deb: run `make deb` first")
    return debs[-1]


class Listener:
    """listen.py in the container; its StackChanged lines in a queue."""

    def __init__(self, t: Trials) -> None:
        self.proc = subprocess.Popen(
            t.c.command("python3", LISTEN), stdout=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if self.lines.get(timeout=30) != "ready":
            raise RuntimeError("the StackChanged listener did not start")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def stack_changed(self, generation: int, timeout: float = 30) -> int:
        """CLOCK_MONOTONIC (usec) at which StackChanged for `generation` was received."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            event: dict[str, Any] = json.loads(line)
            if event["generation"] == generation:
                return int(event["t"]) // 1000

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def one_run(t: Trials, listener: Listener) -> tuple[float, float, dict[str, Json]]:
    """(StackChanged after the unit failed, the unit's exit to its failure), in ms."""
    reply = t.switch(["good", "bad"], confirm=30)
    if reply.error != ROLLED_BACK:
        raise RuntimeError(f"the switch to [good, bad] was not rolled back: {reply}")
    trial = max(
        g.number
        for g in t.generations()
        if g.desired == ["good", "bad"] and g.status == "rolled-back"
    )
    made = t.rolled_back_from(trial)
    changed = listener.stack_changed(made.number)
    props = t.c.show(
        "bad.service", "ExecMainExitTimestampMonotonic", "InactiveEnterTimestampMonotonic"
    )
    exited = int(props["ExecMainExitTimestampMonotonic"])
    failed = int(props["InactiveEnterTimestampMonotonic"])
    if not exited or not failed or failed < exited:
        raise RuntimeError(f"bad.service's timestamps are not there: {props}")
    t.c.run("systemctl", "reset-failed", "bad.service", check=False)
    detail: dict[str, Json] = {
        "trial": trial,
        "rollback": made.number,
        "reason": reply.message,
    }
    return (changed - failed) / 1000, (failed - exited) / 1000, detail


def measure(runs: int) -> tuple[list[float], list[float], list[Json]]:
    beyond: list[float] = []
    systemd: list[float] = []
    details: list[Json] = []
    with run_dir() as workdir, attached_loops() as held:
        images = build_images(workdir, ("good", "bad"))
        machine = trials_container(rootfs_tarball(), workdir, newest_deb(), images, held)
        try:
            machine.boot()
            t = Trials(machine)
            machine.wait_active("personalityd.service")
            wait_until(lambda: len(machine.personalities()) == 2, 60, "both volumes found")
            if t.switch(["good"]).error:
                raise RuntimeError("could not stack [good]")
            machine.wait_active("good.service")
            listener = Listener(t)
            try:
                for run in range(runs):
                    after, report, detail = one_run(t, listener)
                    beyond.append(after)
                    systemd.append(report)
                    details.append(detail)
                    print(
                        f"run {run + 1}: bad.service failed {report:.1f} ms after its exit; "
                        f"StackChanged of the rollback {after:.1f} ms after that",
                        flush=True,
                    )
            finally:
                listener.stop()
        finally:
            machine.cleanup()
    return beyond, systemd, details


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("trial_rollback: must run as root (loop devices, systemd-nspawn)")
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_RUNS
    beyond, systemd, details = measure(runs)
    row = measured(
        "trial_rollback",
        "automatic rollback: a trial's failing service (exit 1) to StackChanged of the "
        "restored stack",
        "ms beyond systemd",
        beyond,
        reference=(
            "systemd's own report: the service's exit to the unit `failed` "
            "(ExecMainExitTimestamp to InactiveEnterTimestamp)",
            systemd,
        ),
        ratios=[],
        goal=f"under {GOAL_MS:.0f} ms beyond systemd's report, median",
        met=statistics.median(beyond) < GOAL_MS,
        notes="bench/trial_rollback.py (not part of `make bench`: it boots a container with "
        "systemd as PID 1): Switch [good] -> [good, bad] with confirm 30, bad.service exits 1 "
        "after 0.3 s; personalityd figure = CLOCK_MONOTONIC at which a D-Bus client in the "
        "container received StackChanged of the rollback's generation minus the unit's "
        "InactiveEnterTimestampMonotonic; includes the daemon seeing the failure, stopping "
        "bad's service, the swap back to [good], the state and the journal; exit to "
        "StackChanged: median "
        f"{statistics.median(a + b for a, b in zip(beyond, systemd, strict=True)):.1f} ms; "
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        extra={"runs": details},
    )
    _rows, meta = load()
    write_results(merged([row], partial=True), meta)
    print(
        f"trial_rollback: {statistics.median(beyond):.1f} ms ({min(beyond):.1f} to "
        f"{max(beyond):.1f}) beyond systemd's report of {statistics.median(systemd):.1f} ms "
        f"({min(systemd):.1f} to {max(systemd):.1f}); goal under {GOAL_MS:.0f} ms: "
        f"{'met' if row.met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
