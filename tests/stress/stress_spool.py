"""A hostile spool: the daemon answers every file with its refusal and stays responsive."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.daemon import Daemon
from testkit.images import build_image
from testkit.loops import LoopDevices
from testkit.spool import drop, results, spool_answers, wait_answered
from testkit.stack import expect_stack, files_of

BURST = int(os.environ.get("STRESS_SPOOL_BURST", "10000"))


def _answer(spool: Path, stem: str, timeout: float = 30) -> dict[str, Any]:
    wait_answered(spool, [stem], timeout)
    ((where, result),) = results(spool)[stem]
    result["_dir"] = where
    return result


def test_hostile_files_and_names_are_refused(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    trees = {"ok1": files_of("ok1", 5)}
    loop_devices.attach(build_image(tmp_path, "ok1", trees["ok1"]))
    daemon.start()
    spool = daemon.spool_dir
    expected: dict[str, str] = {}

    (spool / "shadow.json").symlink_to("/etc/shadow")
    expected["shadow"] = "invalid-request"
    os.mkfifo(spool / "fifo.json")
    expected["fifo"] = "invalid-request"
    with open(spool / ".tmp-big", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse
    (spool / ".tmp-big").rename(spool / "big.json")
    expected["big"] = "invalid-request"
    (spool / ".tmp-nobody").write_text(json.dumps({"action": "attach", "personality": "ok1"}))
    os.chown(spool / ".tmp-nobody", 65534, 65534)
    (spool / ".tmp-nobody").rename(spool / "nobody.json")
    expected["nobody"] = "access-denied"
    for stem, name in {
        "slash": "a/b",
        "dotdot": "..",
        "nul": "a\u0000b",
        "long": "x" * 10240,
        "traversal": "../../etc",
    }.items():
        drop(spool, stem, {"action": "attach", "personality": name})
        expected[stem] = "invalid-name"
    drop(spool, "longid", {"action": "attach", "personality": "ok1", "id": "i" * 10240})
    expected["longid"] = "invalid-request"
    drop(spool, "badutf8", b'{"action": "attach", "personality": "\xff\xfe"}')
    expected["badutf8"] = "invalid-request"
    drop(spool, "switchlong", {"action": "switch", "personalities": ["x" * 10240] * 5})
    expected["switchlong"] = "invalid-name"

    wait_answered(spool, expected, timeout=300)
    answers = spool_answers(spool, expected)
    for stem, code in expected.items():
        assert answers[stem]["status"] == "error", (stem, answers[stem])
        assert answers[stem]["code"] in (code, "invalid-request"), (stem, answers[stem])
    shadow_text = " ".join(json.dumps(a) for a in answers.values())
    assert "root:" not in shadow_text
    # Still responsive, nothing changed by any of it.
    ok = daemon.request({"action": "attach", "personality": "ok1"}, timeout=60)
    assert ok["status"] == "ok" and ok["generation"] == 1, ok
    expect_stack(daemon, ["ok1"], trees)


def test_ten_thousand_files_in_one_burst(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    trees = {n: files_of(n, 5) for n in ("b1", "b2")}
    for name, tree in trees.items():
        loop_devices.attach(build_image(tmp_path, name, tree))
    daemon.start()
    spool = daemon.spool_dir
    stems = [f"f{i:05d}" for i in range(BURST)]
    bodies: list[bytes] = []
    for i in range(BURST):
        kind = i % 10
        if kind < 6:
            bodies.append(b"{ not json")
        elif kind < 8:
            bodies.append(json.dumps({"action": "detach", "personality": "b1"}).encode())
        elif kind == 8:
            bodies.append(json.dumps({"action": "attach", "personality": "b1"}).encode())
        else:
            bodies.append(json.dumps({"action": "switch", "personalities": ["b1", "b2"]}).encode())
    for stem, body in zip(stems, bodies, strict=True):
        (spool / f".tmp-{stem}").write_bytes(body)
    # The burst: all renamed in while the daemon is stopped (SIGSTOP), so it finds every one
    # waiting in its inotify queue at once, however long the renames took on this machine.
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        for stem in stems:
            (spool / f".tmp-{stem}").rename(spool / f"{stem}.json")
        dropped = time.monotonic() - started
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    started = time.monotonic()
    probe = daemon.request({"action": "attach", "personality": "b2"}, timeout=600)
    assert probe["status"] == "ok", probe
    probe_answered = time.monotonic() - started
    wait_answered(spool, stems, timeout=600)
    print(
        f"{BURST} files renamed in over {dropped:.2f} s; the probe answered after "
        f"{probe_answered:.2f} s, all after {time.monotonic() - started:.2f} s"
    )
    answers = spool_answers(spool, stems)
    for i, stem in enumerate(stems):
        assert (answers[stem]["status"] == "ok") == (i % 10 >= 6), (stem, answers[stem])
    assert daemon.running()
    expect_stack(daemon, ["b1", "b2"], trees)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {"action": st.sampled_from(["attach", "detach", "switch", "ATTACH", "", "reboot"])},
    optional={
        "personality": st.one_of(st.text(max_size=70), json_values),
        "personalities": st.one_of(st.lists(st.text(max_size=10), max_size=3), json_values),
        "id": json_values,
        "timeout": st.one_of(st.floats(allow_nan=True), st.integers(), json_values),
        "force": json_values,
        "extra": json_values,
    },
)
bodies = st.one_of(
    request_like.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


def test_generated_bodies_are_answered(
    daemon: Daemon, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    trees = {"gen": files_of("gen", 5)}
    loop_devices.attach(build_image(tmp_path, "gen", trees["gen"]))
    daemon.start()
    spool = daemon.spool_dir
    counter = iter(range(10**6))
    stems: list[str] = []

    @settings(
        max_examples=int(os.environ.get("STRESS_HYPOTHESIS_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(bodies)
    def one(body: bytes) -> None:
        stem = f"h{next(counter):05d}"
        stems.append(stem)
        drop(spool, stem, body)
        result = _answer(spool, stem)
        assert result["status"] in ("ok", "error"), result
        assert daemon.running(), daemon.log_text()[-2000:]

    one()
    spool_answers(spool, stems)
    ok = daemon.request({"action": "switch", "personalities": ["gen"]}, timeout=60)
    assert ok["status"] == "ok", ok
    expect_stack(daemon, ["gen"], trees)
