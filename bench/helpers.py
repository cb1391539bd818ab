"""Small processes the benchmark runs beside the daemon.

    helpers.py reader FILE STOPFILE        read FILE in a loop until STOPFILE exists; print JSON
    helpers.py naive-swap TARGET N A B     umount-then-mount TARGET N times between layer lists
    helpers.py switcher SPOOL STOPFILE A B switch between stacks A and B until STOPFILE exists

`reader` counts reads, errors by errno name, and reads whose bytes differ from the first read.
`naive-swap` is the reference for the readers row: the obvious way to replace an overlay,
`umount2(target, MNT_DETACH)` then `mount(2)` of the new one, with the layer lists A and B
(colon-separated, top first) alternating. It prints the seconds each swap took as JSON.
`switcher` is the load of the dbus row: switch requests through the spool, back to back.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import time
from pathlib import Path

from testkit.spool import ResultWatch, drop, wait_result


def reader(path: str, stop: str) -> None:
    reads = 0
    errors: dict[str, int] = {}
    mismatches = 0
    reference: bytes | None = None
    started = time.monotonic()
    check_every = 256
    while True:
        for _ in range(check_every):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                errors[name] = errors.get(name, 0) + 1
            else:
                if reference is None:
                    reference = data
                elif data != reference:
                    mismatches += 1
            reads += 1
        if os.path.exists(stop):
            break
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "reads": reads,
                "errors": errors,
                "error_count": sum(errors.values()),
                "mismatches": mismatches,
                "seconds": elapsed,
            }
        )
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY = 1
MNT_DETACH = 2


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def naive_swap(target: str, count: int, a: str, b: str) -> None:
    times = []
    for i in range(count):
        layers = (b if i % 2 == 0 else a).encode()
        started = time.monotonic()
        _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")
        _check(
            _libc.mount(b"naive", target.encode(), b"overlay", MS_RDONLY, b"lowerdir=" + layers),
            f"mount overlay on {target}",
        )
        times.append(time.monotonic() - started)
        time.sleep(0.02)  # the daemon's swaps are spaced by its rebuild work too
    print(json.dumps({"swap_seconds": times}))


def switcher(spool: str, stop: str, a: str, b: str) -> None:
    """Switch between the comma-separated stacks A and B through the spool until STOPFILE."""
    count = 0
    spool_dir = Path(spool)
    with ResultWatch(spool_dir) as watch:
        while not os.path.exists(stop):
            names = (a if count % 2 == 0 else b).split(",")
            name = f"sw-{os.getpid()}-{count}"
            drop(spool_dir, name, {"action": "switch", "personalities": names})
            wait_result(spool_dir, name, timeout=120, watch=watch, moved=False)
            count += 1
    print(json.dumps({"switches": count}))


def main() -> None:
    command = sys.argv[1]
    if command == "switcher":
        switcher(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        return
    if command == "reader":
        reader(sys.argv[2], sys.argv[3])
    elif command == "naive-swap":
        naive_swap(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
