"""hotplug: a desired volume's loop device attached, to StackChanged; beside udev's own event."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from client import timed_switch
from dataset import HOT, hot_recipes
from harness import Env
from progress import log
from record import Benchmark, Row, measured
from settings import HOT_FILES, RUN_DIR, RUNS
from testkit.contract import BUS, PATH
from testkit.dbus import Signals
from testkit.polling import wait_for
from testkit.udev import UdevMonitor, udev_settle


def _stack_changed(attached: bool) -> Callable[[Message], bool]:
    """A StackChanged signal whose attached list has (or, with False, lacks) the hot volume."""

    def predicate(msg: Message) -> bool:
        return msg.member == "StackChanged" and (HOT.name in msg.body[1]) == attached

    return predicate


async def _one_run(env: Env, signals: Signals, monitor: UdevMonitor) -> tuple[float, float]:
    """(ms from udev's event to StackChanged, ms from losetup to udev's event)."""
    dev = env.devices.pop(HOT.name)
    signals.skip_received()
    env.loops.yank(dev)
    await signals.wait_for(_stack_changed(False), 30)
    wait_for(lambda: not env.loops.is_ours(dev), 30, "the yanked device freed", interval=0.005)
    udev_settle()
    await asyncio.sleep(0.3)
    signals.skip_received()
    started = time.monotonic()
    env.attach([HOT], settle=False)
    newdev = env.devices[HOT.name]
    signal_at, _ = await signals.wait_stamped(_stack_changed(True), 30)
    udev_settle()
    event = monitor.wait_for(
        "change", newdev, lambda e: "ID_FS_TYPE" in e.properties and e.stamp >= started, 5
    )
    return (signal_at - event.stamp) * 1000, (event.stamp - started) * 1000


async def _runs(env: Env, monitor: UdevMonitor) -> tuple[list[float], list[float]]:
    beyond: list[float] = []
    udev_lat: list[float] = []
    bus = await MessageBus(bus_address=env.bus_address).connect()
    try:
        async with Signals(bus, sender=BUS, path=PATH) as signals:
            for run in range(RUNS):
                after_udev, udev_ms = await _one_run(env, signals, monitor)
                beyond.append(after_udev)
                udev_lat.append(udev_ms)
                log(
                    f"hotplug run {run + 1}: udev event {udev_ms:.1f} ms after losetup, "
                    f"StackChanged {after_udev:.1f} ms after the udev event"
                )
    finally:
        bus.disconnect()
    return beyond, udev_lat


def measure(env: Env) -> list[Row]:
    env.attach([HOT])
    daemon = env.start_daemon(dbus=True)
    timed_switch(daemon, [HOT.name])
    with UdevMonitor(RUN_DIR / "udev-monitor.log") as monitor:
        beyond, udev_lat = asyncio.run(_runs(env, monitor))
    return [
        measured(
            "hotplug",
            f"hotplug: loop device attached (volume desired, {HOT_FILES:,} files) to "
            "StackChanged",
            "ms beyond udev",
            beyond,
            reference=(
                "udev's own event delivery: losetup to the `udevadm monitor` UDEV change stamp "
                "(ms)",
                udev_lat,
            ),
            goal="under 50 ms beyond udev's event, median",
            met=statistics.median(beyond) < 50,
            notes="personalityd figure = StackChanged received by a D-Bus client minus the "
            "CLOCK_MONOTONIC stamp `udevadm monitor` gave the UDEV change event; includes probe, "
            "mount, index (new device, new identity), conflicts, overlay, journal",
            ratios=[],
        )
    ]


BENCHMARK = Benchmark("hotplug", hot_recipes, measure)
