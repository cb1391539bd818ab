"""Block devices from udev: coldplug enumeration and live events, on the asyncio loop.

The monitor's netlink socket is plugged into the loop with `add_reader`; no threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pyudev
import structlog

from personalityd.core.model import BlockDevice

log = structlog.get_logger()


@dataclass(frozen=True)
class DeviceEvent:
    action: str  # "add", "change", "remove"
    device: BlockDevice


def to_block_device(device: pyudev.Device) -> BlockDevice:
    properties = {str(k): str(v) for k, v in device.properties.items()}
    devnum = device.device_number
    try:
        diskseq = int(properties.get("DISKSEQ", "0"))
    except ValueError:
        diskseq = 0
    return BlockDevice(
        devnode=device.device_node or properties.get("DEVNAME", ""),
        devnum=(os.major(devnum), os.minor(devnum)),
        properties=properties,
        diskseq=diskseq,
    )


def enumerate_block_devices(context: pyudev.Context | None = None) -> Iterator[BlockDevice]:
    """Coldplug: every block device udev knows about now."""
    for device in (context or pyudev.Context()).list_devices(subsystem="block"):
        if device.device_node:
            yield to_block_device(device)


class UdevMonitor:
    """Live block device events. Start it before enumerating, so nothing falls in between."""

    def __init__(self) -> None:
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source="udev")
        self.monitor.filter_by("block")
        self.monitor.set_receive_buffer_size(16 * 1024 * 1024)
        self.queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.monitor.start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.monitor.fileno(), self._drain)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.monitor.fileno())
            self._loop = None

    def _drain(self) -> None:
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: the kernel dropped events; a rescan follows
                log.warning("udev_events_lost", error=str(exc))
                self.queue.put_nowait(DeviceEvent("rescan", BlockDevice("", (0, 0), {})))
                continue
            if device is None:
                return
            if not device.device_node or device.action is None:
                continue
            self.queue.put_nowait(DeviceEvent(device.action, to_block_device(device)))

    async def events(self) -> AsyncIterator[DeviceEvent]:
        while True:
            yield await self.queue.get()
