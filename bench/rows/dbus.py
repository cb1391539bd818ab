"""dbus: ListPersonalities latency from concurrent clients while stacks switch back to back."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from client import timed_switch
from dataset import STACK_A, STACK_B, stack_recipes
from harness import Env
from profiling import profiled
from progress import log
from record import Benchmark, Json, Row, measured
from settings import DBUS_CLIENTS, DBUS_RUNS, DBUS_SECONDS, HELPERS, RUN_DIR
from testkit.daemon import Daemon
from testkit.dbus import manager_message


async def _dbus_clients(address: str, seconds: float, clients: int) -> list[float]:
    """Each client calls ListPersonalities back to back for `seconds`; every call's latency."""
    buses = [await MessageBus(bus_address=address).connect() for _ in range(clients)]
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(bus: MessageBus) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = await bus.call(manager_message("ListPersonalities"))
            latencies.append(time.monotonic() - started)
            if reply.message_type is not MessageType.METHOD_RETURN:
                raise RuntimeError(f"ListPersonalities failed: {reply.body}")

    try:
        await asyncio.gather(*(client(b) for b in buses))
    finally:
        for bus in buses:
            bus.disconnect()
    return latencies


def _switcher(daemon: Daemon, stop: Path) -> subprocess.Popen[str]:
    """A separate process switching A <-> B through the spool until `stop` exists."""
    stop.unlink(missing_ok=True)
    return subprocess.Popen(
        [
            *(sys.executable, str(HELPERS), "switcher", str(daemon.spool_dir), str(stop)),
            *(",".join(STACK_A), ",".join(STACK_B)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def _one_run(env: Env, daemon: Daemon, run: int) -> dict[str, Json]:
    stop = RUN_DIR / "switcher-stop"
    switcher = _switcher(daemon, stop)
    try:
        with profiled(daemon, f"dbus-{run + 1}", DBUS_SECONDS):
            latencies = asyncio.run(_dbus_clients(env.bus_address, DBUS_SECONDS, DBUS_CLIENTS))
    finally:
        stop.touch()
        out, _ = switcher.communicate(timeout=120)
    switches = json.loads(out)["switches"] if out.strip() else -1
    latencies.sort()
    return {
        "calls": len(latencies),
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "max_ms": latencies[-1] * 1000,
        "switches": switches,
    }


def measure(env: Env) -> list[Row]:
    env.attach(stack_recipes())
    daemon = env.start_daemon(dbus=True)
    timed_switch(daemon, STACK_A)
    timed_switch(daemon, STACK_B)
    p99s: list[float] = []
    details: list[Json] = []
    for run in range(DBUS_RUNS):
        detail = _one_run(env, daemon, run)
        p99 = detail["p99_ms"]
        assert isinstance(p99, float)
        p99s.append(p99)
        details.append(detail)
        log(f"dbus run {run + 1}: {detail}")
    return [
        measured(
            "dbus",
            f"D-Bus ListPersonalities p99 latency, {DBUS_CLIENTS} concurrent clients for "
            f"{DBUS_SECONDS:g} s, during switches",
            "ms",
            p99s,
            goal="p99 under 20 ms",
            met=statistics.median(p99s) < 20,
            notes=f"clients: {DBUS_CLIENTS} dbus-fast connections in one process on a private "
            "dbus-daemon; switches A<->B back to back through the spool meanwhile",
            ratios=None,
            extra={"runs": details},
        )
    ]


BENCHMARK = Benchmark("dbus", stack_recipes, measure)
