"""The D-Bus clients users have, as the tests run them: busctl and gdbus command lines, run
without blocking the test's event loop (which may be serving the interface or watching
signals). Error names are spelled out from the contract (docs/dbus.md), not imported."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testkit.contract import BUS, IFACE, PATH

ERR = "org.personalityd.personality1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
FAILED = "org.freedesktop.DBus.Error.Failed"

# A command prefix that runs the rest as `nobody` (no supplementary groups).
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    def err_line(self) -> str:
        """The one line on stderr a failure must give (and no traceback)."""
        assert self.err.endswith("\n") and self.err.count("\n") == 1, repr(self.err)
        assert "Traceback" not in self.err
        return self.err.rstrip("\n")


async def arun(*argv: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> Result:
    """Run a command without blocking this test's event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def busctl(address: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, "busctl", f"--address={address}", *args]


def busctl_call(address: str, member: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return busctl(address, "call", BUS, PATH, IFACE, member, *args, prefix=prefix)


def busctl_json(address: str, member: str, *args: str) -> list[str]:
    return busctl(address, "--json=short", "call", BUS, PATH, IFACE, member, *args)


def gdbus_call(address: str, member: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [
        *prefix,
        *("gdbus", "call", "--address", address, "--dest", BUS, "--object-path", PATH),
        *("--method", f"{IFACE}.{member}", *args),
    ]
