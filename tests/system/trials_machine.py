"""The trials' container: personalities whose services stay up, fail, or run health checks,
booted under systemd with the package, and what the trial tests and the rollback benchmark
read and call inside.

Used by `tests/system/test_trials.py` and `bench/trial_rollback.py`. Every personality ships
`/usr/share/trial/shared` with its own name as content, so whichever is on top is visible
there, and `/usr/share/trial/<name>` of its own.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nspawn import (
    Container,
    LoopDevices,
    build_image,
    enable_unit,
    install_deb,
    unpack_rootfs,
    wait_until,
    write_file,
    write_udev_config,
)

BUS_NAME = "org.personalityd.personality1"
OBJECT_PATH = "/org/personalityd/personality1"
INTERFACE = "org.personalityd.personality1.Manager"
ROLLED_BACK = "org.personalityd.personality1.Error.RolledBack"

TRIAL_ID = "ff8126e592204485bd2ed37326e8cab3"
CONFIRMED_ID = "cf7ea7a0ed7d4c18bfb93a266a8add35"
ROLLED_BACK_ID = "5beb5094764f4b60a639610dd1185344"

SHARED = "/usr/share/trial/shared"
CONFIG_DROPIN = "/etc/personalityd/personalityd.toml.d/50-trials-test.toml"
TRIALS_CONTAINER_KEY = pytest.StashKey[Container]()
# The units whose journal a failed test's report shows.
TRIALS_UNITS = (
    "personalityd.service",
    "personality@*",
    "good.service",
    "alt.service",
    "bad*.service",
    "hc*.service",
    "needs-*.service",
    "trial-early.service",
)

# Scripts the tests run inside (in the rootfs before boot, outside every stacked hierarchy).
TOOLS = "/opt/trialtest"
CALL = f"{TOOLS}/call.py"
LISTEN = f"{TOOLS}/listen.py"
READER = f"{TOOLS}/reader.py"

_DBUS_PRELUDE = f"""\
import asyncio, json, sys, time
sys.path.insert(0, "/usr/lib/personalityd/lib")
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS, PATH, INTERFACE = {BUS_NAME!r}, {OBJECT_PATH!r}, {INTERFACE!r}


def plain(value):
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {{k: plain(v) for k, v in value.items()}}
    return value
"""

# call.py MEMBER SIGNATURE JSON-ARGS: one method call on the daemon (no timeout of its own: a
# trial's answer waits for its end); a JSON object argument is an a{{sv}} of [type, value]
# pairs. Prints {"type", "error", "body"} as JSON.
CALL_SCRIPT = _DBUS_PRELUDE + textwrap.dedent(
    """\

    def argument(value):
        if isinstance(value, dict):
            return {k: Variant(sig, v) for k, (sig, v) in value.items()}
        return value


    async def main():
        member, signature, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        reply = await bus.call(Message(
            destination=BUS, path=PATH, interface=INTERFACE, member=member,
            signature=signature, body=[argument(a) for a in args]))
        print(json.dumps({
            "type": "error" if reply.message_type == MessageType.ERROR else "return",
            "error": reply.error_name or "",
            "body": plain(reply.body),
        }), flush=True)

    asyncio.run(main())
    """
)

# listen.py: one JSON line per StackChanged signal, with CLOCK_MONOTONIC (ns) at receipt;
# "ready" once the match is in place.
LISTEN_SCRIPT = _DBUS_PRELUDE + textwrap.dedent(
    """\

    async def main():
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        rule = f"type='signal',interface='{INTERFACE}',member='StackChanged'"
        await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))

        def on_message(message):
            if message.member == "StackChanged" and message.interface == INTERFACE:
                now = time.monotonic_ns()
                generation, attached = message.body
                print(json.dumps({"t": now, "generation": generation, "attached": attached}),
                      flush=True)

        bus.add_message_handler(on_message)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)

# reader.py PATH EXPECTED,... STOP SEEN: reads PATH in a loop until STOP exists; every change of
# content goes to SEEN; prints "reads errors" (errors: failed reads and unexpected content).
READER_SCRIPT = textwrap.dedent(
    """\
    import os, sys
    path, stop, seen = sys.argv[1], sys.argv[3], sys.argv[4]
    expected = {e + "\\n" for e in sys.argv[2].split(",")}
    errors = reads = 0
    last = None
    with open(seen, "w") as out:
        while not os.path.exists(stop):
            try:
                with open(path) as f:
                    data = f.read()
            except OSError as exc:
                data = f"error: {exc}\\n"
            if data not in expected:
                errors += 1
            reads += 1
            if data != last:
                out.write(data)
                out.flush()
                last = data
    print(reads, errors)
    """
)


# --------------------------------------------------------------------------------------------
# the personalities


def _service(description: str, body: str) -> str:
    return f"[Unit]\nDescription={description}\n\n[Service]\n{body}"


STAYS_UP = "ExecStart=/bin/sleep infinity\n"
# What the test personalities are: name -> (units, PERSONALITY_SERVICES, PERSONALITY_HEALTHCHECK).
PERSONALITIES: dict[str, tuple[dict[str, str], str, str]] = {
    "good": ({"good.service": STAYS_UP}, "good.service", ""),
    "alt": ({"alt.service": STAYS_UP}, "alt.service", ""),
    # Up for 0.3 s, then fails (Type=simple: systemd already reported it started).
    "bad": (
        {"bad.service": "Type=simple\nExecStart=/bin/sh -c 'sleep 0.3; exit 1'\n"},
        "bad.service",
        "",
    ),
    "badoneshot": (
        {"badoneshot.service": "Type=oneshot\nExecStart=/bin/sh -c 'exit 1'\n"},
        "badoneshot.service",
        "",
    ),
    "hcfail": (
        {
            "hcfail.service": STAYS_UP,
            "hcfail-check.service": "Type=oneshot\nExecStart=/bin/sh -c 'exit 1'\n",
        },
        "hcfail.service",
        "hcfail-check.service",
    ),
    # The check records what state the personality's service was in when it ran.
    "hcok": (
        {
            "hcok.service": STAYS_UP,
            "hcok-check.service": (
                "Type=oneshot\n"
                "ExecStart=/bin/sh -c 'systemctl is-active hcok.service > /run/hcok-check.ran'\n"
            ),
        },
        "hcok.service",
        "hcok-check.service",
    ),
}


def build_images(workdir: Path, names: Sequence[str] = tuple(PERSONALITIES)) -> dict[str, Path]:
    base = {"ID": "debian", "VERSION_ID": "12", "IMAGE_VERSION": "1.0"}
    images = {}
    for name in names:
        units, services, healthcheck = PERSONALITIES[name]
        files: dict[str, str | bytes] = {
            "usr/share/trial/shared": f"{name}\n",
            f"usr/share/trial/{name}": f"{name}\n",
        }
        for unit, body in units.items():
            files[f"usr/lib/systemd/system/{unit}"] = _service(f"trial test unit of {name}", body)
        manifest = {**base, "PERSONALITY_SERVICES": services}
        if healthcheck:
            manifest["PERSONALITY_HEALTHCHECK"] = healthcheck
        images[name] = build_image(workdir, name, files, manifest)
    return images


# --------------------------------------------------------------------------------------------
# the container


def configure(root: Path, loops: Mapping[str, str]) -> None:
    """Test-only configuration (none of it ships in the package)."""
    kernels = "|".join(Path(dev).name for dev in loops.values())
    write_file(
        root,
        "/etc/udev/rules.d/70-personalityd-trials-test.rules",
        f'SUBSYSTEM=="block", KERNEL=="{kernels}", ENV{{PERSONALITYD_VOLUME}}="1"\n',
    )
    write_file(
        root,
        "/etc/personalityd/personalityd.toml.d/40-trials-volumes.toml",
        "[volumes]\n"
        'match = [{ PERSONALITYD_VOLUME = "1" }]\n\n'
        "[writable]\n"
        "# no writable volume: read-only stacks\n"
        'match = [{ PERSONALITYD_SYSTEM_TEST_WRITABLE = "1" }]\n',
    )
    write_udev_config(root)
    for path, text in ((CALL, CALL_SCRIPT), (LISTEN, LISTEN_SCRIPT), (READER, READER_SCRIPT)):
        write_file(root, path, text)
    # What a unit ordered after the daemon sees at boot.
    write_file(
        root,
        "/etc/systemd/system/trial-early.service",
        "[Unit]\n"
        "Description=trials test: what a unit ordered after personalityd sees at boot\n"
        "Wants=personalityd.service\n"
        "After=personalityd.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart=/bin/sh -c 'cat {SHARED} > /run/trial-early.out "
        "|| echo missing > /run/trial-early.out'\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n",
    )
    enable_unit(root, "trial-early.service")
    write_file(
        root,
        "/etc/systemd/system/needs-bad.service",
        "[Unit]\n"
        "Description=trials test: needs the bad personality\n"
        "Requires=personality@bad.service\n"
        "After=personality@bad.service\n\n"
        "[Service]\n"
        "ExecStart=/bin/sleep infinity\n",
    )
    # Records the daemon's history as it is when the unit starts.
    write_file(
        root,
        "/etc/systemd/system/needs-alt.service",
        "[Unit]\n"
        "Description=trials test: needs the alt personality\n"
        "Requires=personality@alt.service\n"
        "After=personality@alt.service\n\n"
        "[Service]\n"
        f"ExecStart=/bin/sh -c 'busctl --json=short call {BUS_NAME} {OBJECT_PATH} {INTERFACE} "
        "ListGenerations > /run/needs-alt.generations; exec sleep infinity'\n",
    )


def trials_container(
    tarball: Path, workdir: Path, deb: Path, images: Mapping[str, Path], held: LoopDevices
) -> Container:
    """The trials' container, not booted yet (its loop devices made of files in `workdir`)."""
    root = unpack_rootfs(tarball, workdir / "rootfs")
    install_deb(root, deb)
    loops = {name: held.attach(image) for name, image in images.items()}
    configure(root, loops)
    return Container(root, workdir, list(loops.values()))


# --------------------------------------------------------------------------------------------
# what the tests call and read


@dataclass(frozen=True)
class Generation:
    number: int
    desired: list[str]
    usec: int
    status: str
    cause: str


@dataclass(frozen=True)
class Reply:
    type: str
    error: str
    body: list[Any]

    @property
    def message(self) -> str:
        return str(self.body[0]) if self.error and self.body else ""


def options(
    confirm: int | None = None, mode: str | None = None, **extra: tuple[str, Any]
) -> dict[str, tuple[str, Any]]:
    """The a{sv} options of a changing call, in the form call.py takes."""
    opts = dict(extra)
    if confirm is not None:
        opts["confirm"] = ("u", confirm)
    if mode is not None:
        opts["confirm_mode"] = ("s", mode)
    return opts


class Trials:
    """The booted container and the calls the trial tests make in it."""

    def __init__(self, container: Container) -> None:
        self.c = container

    # -- calls ------------------------------------------------------------------------------

    def call(self, member: str, signature: str, *args: Any, timeout: float = 120) -> Reply:
        proc = self.c.run("python3", CALL, member, signature, json.dumps(args), timeout=timeout)
        data = json.loads(proc.stdout)
        return Reply(data["type"], data["error"], data["body"])

    def call_in_background(self, member: str, signature: str, *args: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.c.command("python3", CALL, member, signature, json.dumps(args)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def reply_of(proc: subprocess.Popen[str], timeout: float = 120) -> Reply:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"call.py failed ({proc.returncode}): {err}"
        data = json.loads(out)
        return Reply(data["type"], data["error"], data["body"])

    def switch(
        self, names: Sequence[str], confirm: int | None = None, mode: str | None = None
    ) -> Reply:
        return self.call("Switch", "asa{sv}", list(names), options(confirm, mode))

    def busctl(self, *args: str, timeout: float = 60) -> Any:
        """`busctl --json=short call` on the daemon; the reply's data."""
        out = self.c.run(
            "busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH, INTERFACE, *args,
            timeout=timeout,
        ).stdout  # fmt: skip
        return json.loads(out)["data"] if out.strip() else None

    # -- reading ----------------------------------------------------------------------------

    def generations(self) -> list[Generation]:
        (rows,) = self.busctl("ListGenerations")
        return [Generation(int(g), list(d), int(u), s, c) for g, d, u, s, c in rows]

    def generation(self, number: int) -> Generation:
        found = [g for g in self.generations() if g.number == number]
        assert found, f"generation {number} not in {self.generations()}"
        return found[0]

    def attached(self) -> list[str]:
        out = self.c.run(
            "busctl", "--json=short", "get-property", BUS_NAME, OBJECT_PATH, INTERFACE, "Attached"
        ).stdout
        return [str(n) for n in json.loads(out)["data"]]

    def current(self) -> int:
        out = self.c.run(
            "busctl", "--json=short", "get-property", BUS_NAME, OBJECT_PATH, INTERFACE,
            "Generation",
        ).stdout  # fmt: skip
        return int(json.loads(out)["data"])

    def shared(self) -> str | None:
        proc = self.c.run("cat", SHARED, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def exists(self, path: str) -> bool:
        return self.c.run("test", "-e", path, check=False).returncode == 0

    def wait_trial(self, timeout: float = 60) -> Generation:
        """The trial once ListGenerations shows one."""
        found: list[Generation] = []

        def trial() -> bool:
            found[:] = [g for g in self.generations() if g.status == "trial"]
            return bool(found)

        wait_until(trial, timeout, "a trial generation")
        return found[-1]

    def journal(self, message_id: str, **fields: str | int) -> list[dict[str, Any]]:
        """This boot's journal entries with `message_id` (and the fields given), as JSON."""
        matches = [f"MESSAGE_ID={message_id}", *(f"{k}={v}" for k, v in fields.items())]
        out = self.c.run(
            "journalctl", "--no-pager", "-b", "-o", "json", *matches, timeout=30
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journalled(self, message_id: str, **fields: str | int) -> list[dict[str, Any]]:
        """As `journal`, once there is at least one entry: journald may not have stored what
        the daemon sent right before its answer yet."""
        found: list[dict[str, Any]] = []

        def stored() -> bool:
            found[:] = self.journal(message_id, **fields)
            return bool(found)

        wait_until(stored, 10, f"a journal entry {message_id} with {fields}")
        return found

    def rolled_back_from(self, trial: int) -> Generation:
        """The confirmed generation a rollback of `trial` made (the next one, cause rollback)."""
        later = [g for g in self.generations() if g.number > trial]
        assert later, f"no generation after the trial {trial}: {self.generations()}"
        return later[0]
