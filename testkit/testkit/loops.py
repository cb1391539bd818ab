"""Loop devices attached by one test or benchmark, detached again only while still theirs."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from testkit.processes import run
from testkit.udev import udev_settle, wait_udev_property


def loop_backing_file(dev: str) -> str | None:
    """The backing file of /dev/loopN as the kernel reports it, or None when not set up."""
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def clear_read_only(dev: str) -> None:
    """Clear the kernel's read-only flag of `dev` (`blockdev --setrw`).

    The daemon sets the flag on every volume it mounts, and the kernel keeps it on the loop
    device across `losetup -d`: left set, it would make the next user's writable device (of
    this run, or of another one on this machine) read-only. Call it while `dev` is ours."""
    subprocess.run(["blockdev", "--setrw", dev], capture_output=True, check=False)


class LoopDevices:
    """Loop devices attached by one test; `cleanup()` detaches the ones still ours.

    A device counts as ours while its backing file is the image we attached, so a loop number
    that was freed and taken by someone else in the meantime is never touched.
    """

    def __init__(self) -> None:
        self.attached: dict[str, Path] = {}

    def attach(
        self,
        image: Path,
        read_only: bool = True,
        *,
        settle: bool = True,
        byte_range: tuple[int, int] | None = None,
    ) -> str:
        """`losetup --find --show [--read-only] [--offset O --sizelimit S] IMAGE`.

        By default waits until udev has probed the device (`ID_FS_TYPE`); with `settle=False`
        returns right after losetup (to attach many devices and settle once, or to time udev).
        `byte_range` (offset, size) attaches that part of the image only (as for a partition;
        this machine's kernel has no partition table support). A writable device gets the
        kernel's read-only flag cleared, in case an earlier user of the loop number left it
        set (`blockdev --setro`, as the daemon does to a volume).
        """
        args = ["losetup", "--find", "--show"]
        if read_only:
            args.append("--read-only")
        if byte_range is not None:
            args += [f"--offset={byte_range[0]}", f"--sizelimit={byte_range[1]}"]
        dev = run(*args, image).strip()
        self.attached[dev] = image.resolve()
        if not read_only:
            run("blockdev", "--setrw", dev)
        if settle:
            udev_settle()
            wait_udev_property(dev, "ID_FS_TYPE")
        return dev

    def is_ours(self, dev: str) -> bool:
        image = self.attached.get(dev)
        backing = loop_backing_file(dev)
        return image is not None and backing is not None and Path(backing) == image

    def detach(self, dev: str, settle: bool = True) -> None:
        """`losetup -d DEV` (if still ours); on a busy device the kernel defers it (autoclear)."""
        if self.is_ours(dev):
            clear_read_only(dev)
            proc = subprocess.run(
                ["losetup", "-d", dev], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0 and self.is_ours(dev):
                raise AssertionError(f"losetup -d {dev} failed: {proc.stderr.strip()}")
        self.attached.pop(dev, None)
        if settle:
            udev_settle()

    def yank(self, dev: str) -> None:
        """Surprise removal as the daemon sees it: `losetup -d DEV`, then a `remove` uevent.

        Found by experiment (udev 252): `losetup -d` alone never produces a `remove` event. On
        an idle device it gives two `change` events without `ID_FS_*`; on a busy device (one
        the daemon has mounted) it gives no event at all and only sets autoclear, the device
        working on until its last mount goes. `udevadm trigger --action=remove --settle
        /sys/block/loopN` then delivers a `remove` event (with the old properties) to every
        udev listener, busy or not: for a busy device with the old properties (ID_FS_TYPE...),
        for an idle one without them (the `change` events of the detach cleared them first).
        So after `yank` the daemon has seen `remove`; the kernel frees a busy device (two more
        `change` events, no ID_FS_*) once the daemon has unmounted it.
        """
        if not self.is_ours(dev):
            raise AssertionError(f"{dev} is not a loop device this test attached")
        image = self.attached.pop(dev)
        clear_read_only(dev)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        backing = loop_backing_file(dev)
        if backing is not None and Path(backing) != image:
            return  # freed and already taken by someone else: their device, not ours to touch
        run("udevadm", "trigger", "--action=remove", "--settle", f"/sys/block/{Path(dev).name}")
        # Still ours (busy, autoclear pending): keep it on the list so cleanup re-checks it.
        if backing is not None:
            self.attached[dev] = image

    def cleanup(self) -> None:
        """Detach every device this object attached that is still attached to our image."""
        with contextlib.suppress(AssertionError):
            udev_settle()
        errors = []
        for dev in list(self.attached):
            try:
                self.detach(dev, settle=False)
            except AssertionError as e:
                errors.append(str(e))
        with contextlib.suppress(AssertionError):
            udev_settle()
        if errors:
            raise AssertionError("; ".join(errors))
