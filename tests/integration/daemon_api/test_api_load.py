"""The real daemon under load over D-Bus: many concurrent changes, reads during a long switch.
Behaviour only; how fast it answers is measured by `make bench`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dbus_fast import MessageType, Variant
from dbus_fast.aio import MessageBus
from served_daemon import DOCUMENTED_ERRORS, Images, Serve, connect, listing, no_traceback, read

from testkit.contract import BUS, PATH
from testkit.daemon import Daemon
from testkit.dbus import Signals, call, call_ok, get_property
from testkit.loops import LoopDevices
from testkit.processes import pid_alive, run

# -- load -----------------------------------------------------------------------------------------

STORM = ("s1", "s2", "s3", "s4")


def check_storm_files(root: Path, attached: Sequence[str]) -> None:
    """What the stack shows for `attached` (bottom first) of the STORM personalities."""
    tool = root / "usr/bin/storm-tool"
    if attached:
        assert tool.read_bytes() == attached[-1].encode(), attached
    else:
        assert not tool.exists()
    for name in STORM:
        assert (root / f"etc/storm-{name}.conf").exists() == (name in attached), (name, attached)


async def test_fifty_concurrent_changes_from_five_connections(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    image: Images,
    watcher: MessageBus,
    sandbox_root: Path,
) -> None:
    for name in STORM:
        files = {"usr/bin/storm-tool": name, f"etc/storm-{name}.conf": name}
        loop_devices.attach(image(name, files))
    serve(daemon)
    rng = random.Random(3)
    requests: list[tuple[str, str, tuple[Any, ...]]] = []
    for _ in range(50):
        kind = rng.choice(("Attach", "Detach", "Switch"))
        if kind == "Switch":
            names = rng.sample(STORM, rng.randint(0, 3))
            options = {"force": Variant("b", False)} if rng.random() < 0.3 else {}
            requests.append((kind, "asa{sv}", (names, options)))
        else:
            requests.append((kind, "sa{sv}", (rng.choice(STORM), {})))
    buses = [await connect(system_bus) for _ in range(5)]
    try:
        async with Signals(watcher, sender=BUS, path=PATH) as signals:
            storm = asyncio.gather(
                *(
                    call(buses[i % 5], member, signature, *args)
                    for i, (member, signature, args) in enumerate(requests)
                )
            )
            replies = await asyncio.wait_for(storm, 600)  # a deadline for a hang, not a speed
            # A round trip on the watcher's connection: every earlier signal has arrived.
            attached = await get_property(watcher, "Attached")
        desired = await get_property(watcher, "Desired")
    finally:
        for bus in buses:
            bus.disconnect()
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: no hints

    assert len(replies) == 50
    for (member, _, args), reply in zip(requests, replies, strict=True):
        if reply.message_type is MessageType.METHOD_RETURN:
            assert reply.signature == "b" and isinstance(reply.body[0], bool), (member, args)
        else:
            assert reply.message_type is MessageType.ERROR
            assert reply.error_name in DOCUMENTED_ERRORS, (member, args, reply.body)
    answered = sum(r.message_type is MessageType.METHOD_RETURN for r in replies)
    assert answered >= 45, [(r.error_name, r.body) for r in replies]

    # Every volume is there: the live stack is the desired list, and the last signal said so.
    assert attached == desired
    stack_changes = [list(m.body) for m in signals.received if m.member == "StackChanged"]
    # Calls that arrive while a change runs are coalesced into one rebuild, so the storm may
    # end on the stack it started from (e.g. a final Switch to nothing) with no change at all.
    if attached:
        assert stack_changes, "the stack changed but no StackChanged was sent"
    if stack_changes:
        generations = [g for g, _ in stack_changes]
        assert generations == list(range(generations[0], generations[0] + len(generations)))
        assert stack_changes[-1][1] == attached
        assert await get_property(watcher, "Generation") == generations[-1]
    check_storm_files(sandbox_root, attached)

    # One more request after the storm decides the stack.
    (changed,) = await call_ok(watcher, "Switch", "asa{sv}", ["s3", "s1"], {})
    assert changed == (attached != ["s3", "s1"])
    assert await get_property(watcher, "Attached") == ["s3", "s1"]
    check_storm_files(sandbox_root, ["s3", "s1"])
    assert pid_alive(daemon.pid or 0)
    no_traceback(daemon)


def big_image(tmp_path: Path, name: str, files: int) -> Path:
    """A squashfs personality with `files` small files under usr/share/big-NAME/.

    mksquashfs pseudo definitions (hard links to one pseudo file) stand in for writing the
    files: the image has `files` directory entries, built in a fraction of a second.
    """
    src = tmp_path / "images" / f"{name}.src"
    release = src / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release.parent.mkdir(parents=True)
    release.write_text("ID=_any\nIMAGE_VERSION=1\n")
    (src / "usr/share").mkdir()  # pseudo files go only under directories that exist
    top = f"usr/share/big-{name}"
    lines = [f"{top} d 755 0 0", f"{top}/seed f 644 0 0 echo {name}"]
    per_dir = 300
    for d in range((files + per_dir - 1) // per_dir):
        lines.append(f"{top}/d{d:03d} d 755 0 0")
        count = min(per_dir, files - d * per_dir)
        lines += [f"{top}/d{d:03d}/f{f:03d} L {top}/seed" for f in range(count)]
    pseudo = tmp_path / "images" / f"{name}.pseudo"
    pseudo.write_text("\n".join(lines) + "\n")
    image_path = tmp_path / "images" / f"{name}.squashfs"
    run("mksquashfs", src, image_path, "-noappend", "-quiet", "-no-progress", "-all-root",
        "-pf", pseudo)  # fmt: skip
    return image_path


async def test_list_personalities_answers_during_a_long_switch(
    serve: Serve,
    daemon: Daemon,
    system_bus: str,
    loop_devices: LoopDevices,
    tmp_path: Path,
    client: MessageBus,
    watcher: MessageBus,
    sandbox_root: Path,
) -> None:
    """The switch's work (mounts, then 300,000 entries indexed in worker threads) leaves the
    event loop free: ListPersonalities keeps answering, without error, while the Switch call
    is pending, and an answer shows the switch under way (a volume mounted, not attached yet).
    How fast the answers come is measured by `make bench`, not asserted here."""
    big = ("big1", "big2", "big3")
    for name in big:
        loop_devices.attach(big_image(tmp_path, name, 100_000))
    serve(daemon)
    await listing(watcher)  # warm up both connections
    await listing(client)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 600  # for a hang, not a speed
    switch = asyncio.create_task(call_ok(client, "Switch", "asa{sv}", list(big), {}))
    during: list[dict[str, tuple[str, str, str, str]]] = []
    while not switch.done():
        assert loop.time() < deadline, "the Switch call did not return"
        rows = await listing(watcher)  # an error reply fails the test here
        if not switch.done():
            during.append(rows)
    assert switch.result() == [True]

    def under_way(rows: dict[str, tuple[str, str, str, str]]) -> bool:
        return any(rows[n][0] != "attached" and rows[n][3] for n in big)

    shown = [rows for rows in during if under_way(rows)]
    print(f"{len(during)} answers while the Switch was pending, {len(shown)} showing it under way")
    assert shown, f"no answer showed the switch under way; answers while pending: {during}"
    assert await get_property(client, "Attached") == list(big)
    for name in big:
        assert read(sandbox_root, f"usr/share/big-{name}/d333/f099") == f"{name}\n".encode()
    assert daemon.log_text().count("event=volume_indexed") == 3
