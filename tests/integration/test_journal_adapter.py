"""Journal entries sent by the adapter, read back from the real journald with journalctl."""

from __future__ import annotations

import errno
import io
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from personalityd import log as log_module
from personalityd.adapters.journal import Journal, encode_fields, journal_field_name
from personalityd.core import messages
from personalityd.core.messages import conflict_message
from personalityd.core.model import MASK_DELETED, MASK_HIDDEN, Conflict, ConflictReport, Mask
from personalityd.core.orphans import Orphan
from testkit.contract import MESSAGE_ID_ORPHAN
from testkit.journal import read_journal

pytestmark = pytest.mark.integration


def unique_generation() -> int:
    return 10**12 + secrets.randbelow(10**12)


def conflict(path: str, shadowed: tuple[str, ...], identical: bool = False) -> Conflict:
    return Conflict(path, "/usr", "web", shadowed, identical)


@pytest.mark.usefixtures("journald")
def test_conflict_entry_read_back() -> None:
    generation = unique_generation()
    c = conflict("/usr/bin/tool", ("datascience", "base-tools", "extra"))
    assert Journal().conflict(c, generation)
    entries = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_CONFLICT}", f"PERSONALITY_GENERATION={generation}"
    )
    assert len(entries) == 1
    entry = entries[0]
    assert entry["MESSAGE_ID"] == "3e47b2d0af514d77b3126415a1549afb"
    assert entry["MESSAGE"] == conflict_message(c)
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "personalityd"
    assert entry["PERSONALITY_PATH"] == "/usr/bin/tool"
    assert entry["PERSONALITY_WINNER"] == "web"
    assert entry["PERSONALITY_SHADOWED"] == ["datascience", "base-tools", "extra"]  # top first
    assert entry["PERSONALITY_STACK"] == "web datascience base-tools extra"
    assert entry["PERSONALITY_IDENTICAL"] == "0"
    assert entry["PERSONALITY_HIERARCHY"] == "/usr"
    assert entry["PERSONALITY_GENERATION"] == str(generation)


@pytest.mark.usefixtures("journald")
def test_orphan_entry_read_back() -> None:
    generation = unique_generation()
    orphan = Orphan("/usr", b"lib/python3/dist-packages/numpy", "numpy")
    on_volume = f"orphans/{generation}/_usr/lib/python3/dist-packages/numpy"
    assert Journal().orphan_moved(orphan, generation, on_volume)
    entries = read_journal(
        f"MESSAGE_ID={MESSAGE_ID_ORPHAN}", f"PERSONALITY_GENERATION={generation}"
    )
    assert len(entries) == 1
    entry = entries[0]
    assert entry["PRIORITY"] == "5"
    assert entry["SYSLOG_IDENTIFIER"] == "personalityd"
    assert entry["PERSONALITY_PATH"] == "/usr/lib/python3/dist-packages/numpy"
    assert entry["PERSONALITY_NAME"] == "numpy"
    assert entry["PERSONALITY_HIERARCHY"] == "/usr"
    assert entry["PERSONALITY_ORPHAN"] == on_volume
    assert entry["MESSAGE"] == (
        "Orphan /usr/lib/python3/dist-packages/numpy: written under 'numpy', which left the "
        f"stack; moved aside to {on_volume} on the writable volume"
    )


@pytest.mark.usefixtures("journald")
def test_identical_conflict_with_one_shadowed() -> None:
    generation = unique_generation()
    assert Journal().conflict(conflict("/usr/lib/x", ("base-tools",), True), generation)
    (entry,) = read_journal(f"PERSONALITY_GENERATION={generation}")
    assert entry["PERSONALITY_SHADOWED"] == "base-tools"  # one value: a plain string
    assert entry["PERSONALITY_IDENTICAL"] == "1"


@pytest.mark.usefixtures("journald")
def test_mask_entries_read_back() -> None:
    generation = unique_generation()
    journal = Journal()
    assert journal.mask(Mask("/usr/bin/gone", "/usr", "web", MASK_DELETED), generation)
    assert journal.mask(Mask("/etc/skel", "/etc", "base-tools", MASK_HIDDEN), generation)
    entries = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_MASK}", f"PERSONALITY_GENERATION={generation}", expect=2
    )
    by_path = {e["PERSONALITY_PATH"]: e for e in entries}
    deleted, hidden = by_path["/usr/bin/gone"], by_path["/etc/skel"]
    assert deleted["MESSAGE_ID"] == "727c1463be574032988019655f1f0294"
    assert deleted["PRIORITY"] == "5"
    assert deleted["SYSLOG_IDENTIFIER"] == "personalityd"
    assert deleted["PERSONALITY_NAME"] == "web"
    assert deleted["PERSONALITY_MASK"] == "deleted"
    assert deleted["PERSONALITY_HIERARCHY"] == "/usr"
    assert deleted["MESSAGE"] == "Mask on /usr/bin/gone: 'web' deletes the base's entry (whiteout)"
    assert hidden["PERSONALITY_NAME"] == "base-tools"
    assert hidden["PERSONALITY_MASK"] == "hidden"
    assert hidden["PERSONALITY_HIERARCHY"] == "/etc"
    assert hidden["MESSAGE"] == (
        "Mask on /etc/skel: 'base-tools' hides the base's directory (opaque directory)"
    )


@pytest.mark.usefixtures("journald")
def test_report_stack_limits_mask_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_CONFLICT_ENTRIES", 2)
    generation = unique_generation()
    masks = tuple(Mask(f"/usr/lib/m{i}", "/usr", "web", MASK_DELETED) for i in range(4))
    report = ConflictReport((conflict("/usr/bin/t", ("a",)),), 1, masks)
    Journal().report_stack(generation, ["a", "web"], report)
    singles = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_MASK}", f"PERSONALITY_GENERATION={generation}", expect=2
    )
    assert sorted(e["PERSONALITY_PATH"] for e in singles) == ["/usr/lib/m0", "/usr/lib/m1"]
    (summary,) = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_STACK_CHANGED}", f"PERSONALITY_GENERATION={generation}"
    )
    assert summary["PERSONALITY_MASKS"] == "4"
    assert summary["PERSONALITY_MASKS_LEFT_OUT"] == "2"
    assert "PERSONALITY_CONFLICTS_LEFT_OUT" not in summary
    assert summary["MESSAGE"] == (
        f"Stack generation {generation}: a web "
        "(1 conflict, 1 override, 4 masks; 2 masks not logged singly)"
    )


@pytest.mark.usefixtures("journald")
def test_report_stack_limits_conflict_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_CONFLICT_ENTRIES", 2)
    generation = unique_generation()
    conflicts = [conflict(f"/usr/bin/t{i}", ("base-tools",)) for i in range(5)]
    Journal().report_stack(generation, ["base-tools", "web"], ConflictReport(tuple(conflicts), 3))
    singles = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_CONFLICT}",
        f"PERSONALITY_GENERATION={generation}",
        expect=2,
    )
    assert sorted(e["PERSONALITY_PATH"] for e in singles) == ["/usr/bin/t0", "/usr/bin/t1"]
    (summary,) = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_STACK_CHANGED}", f"PERSONALITY_GENERATION={generation}"
    )
    assert summary["PRIORITY"] == "5"
    assert summary["PERSONALITY_ATTACHED"] == "base-tools web"
    assert summary["PERSONALITY_CONFLICTS"] == "5"
    assert summary["PERSONALITY_OVERRIDES"] == "3"
    assert summary["PERSONALITY_CONFLICTS_LEFT_OUT"] == "3"
    assert summary["PERSONALITY_MASKS"] == "0"
    assert "PERSONALITY_MASKS_LEFT_OUT" not in summary
    assert summary["MESSAGE"] == (
        f"Stack generation {generation}: base-tools web "
        "(5 conflicts, 3 overrides, 0 masks; 3 not logged singly)"
    )


@pytest.mark.usefixtures("journald")
def test_stack_changed_summary() -> None:
    generation = unique_generation()
    assert Journal().stack_changed(generation, ["base-tools", "web"], 1, 0)
    (entry,) = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_STACK_CHANGED}", f"PERSONALITY_GENERATION={generation}"
    )
    assert entry["MESSAGE"] == (
        f"Stack generation {generation}: base-tools web (1 conflict, 0 overrides, 0 masks)"
    )
    assert entry["PERSONALITY_CONFLICTS"] == "1"
    assert entry["PERSONALITY_OVERRIDES"] == "0"
    assert "PERSONALITY_CONFLICTS_LEFT_OUT" not in entry


@pytest.mark.usefixtures("journald")
def test_volume_refused_and_change_failed() -> None:
    token = secrets.token_hex(8)
    journal = Journal()
    assert journal.volume_refused(f"/dev/loop{token}", "web", "two manifests")
    assert journal.volume_refused(f"/dev/loop{token}", None, "no manifest")
    assert journal.change_failed(f"attach web-{token}", "mount failed: EIO")
    refused = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_VOLUME_REFUSED}",
        f"PERSONALITY_DEVICE=/dev/loop{token}",
        expect=2,
    )
    assert [e.get("PERSONALITY_NAME") for e in refused] == ["web", None]
    assert [e["PERSONALITY_REASON"] for e in refused] == ["two manifests", "no manifest"]
    assert all(e["PRIORITY"] == "3" for e in refused)
    assert refused[0]["MESSAGE"] == f"Volume /dev/loop{token} ('web') refused: two manifests"
    (failed,) = read_journal(
        f"MESSAGE_ID={messages.MESSAGE_ID_CHANGE_FAILED}",
        f"PERSONALITY_REQUESTED=attach web-{token}",
    )
    assert failed["PRIORITY"] == "3"
    assert failed["PERSONALITY_REASON"] == "mount failed: EIO"


def test_missing_socket_does_not_raise_and_logs_once(tmp_path: Path) -> None:
    journal = Journal(socket_path=str(tmp_path / "no-socket"))
    with capture_logs() as logs:
        assert not journal.conflict(conflict("/usr/bin/x", ("a",)), 1)
        assert not journal.stack_changed(1, [], 0, 0)
    assert [e["event"] for e in logs] == ["journal_unavailable"]
    assert not journal.available


def test_failing_sendv_then_recovery(tmp_path: Path) -> None:
    """journald stopped (socket file left behind, sendv fails), then started again."""
    sent: list[tuple[bytes, ...]] = []
    failing = True

    def sendv(*items: bytes) -> None:
        if failing:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        sent.append(items)

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "socket"))
    stale.close()
    journal = Journal(socket_path=str(tmp_path / "socket"), sendv=sendv)
    with capture_logs() as logs:
        assert not journal.change_failed("attach web", "x")
        assert not journal.change_failed("attach web", "y")
        failing = False
        assert journal.change_failed("attach web", "z")
        assert journal.change_failed("attach web", "w")
    assert [e["event"] for e in logs] == ["journal_unavailable", "journal_available"]
    assert logs[0]["log_level"] == "warning"
    assert len(sent) == 2
    assert b"PERSONALITY_REASON=z" in sent[0]
    assert b"MESSAGE_ID=" + messages.MESSAGE_ID_CHANGE_FAILED.encode() in sent[0]


def test_encode_fields() -> None:
    assert encode_fields(
        {
            "personality_shadowed": ["a", "b"],
            "N": 7,
            "FLAG": True,
            "OFF": False,
            "PATH": "/usr/bin/\udcff",
        }
    ) == [
        b"PERSONALITY_SHADOWED=a",
        b"PERSONALITY_SHADOWED=b",
        b"N=7",
        b"FLAG=1",
        b"OFF=0",
        b"PATH=/usr/bin/\xff",
    ]


# log.py: events on stderr and natively in the journal


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("journald", "restore_logging")
def test_log_events_reach_stderr_and_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    token = secrets.token_hex(8)
    log_module.setup_logging("debug", journal=True)
    structlog.get_logger("test").warning(
        "volume_refused_test", name="web", token=token, flag=True, **{"odd-key": 1}
    )
    line = stderr.getvalue().strip()
    assert line.startswith("timestamp=")
    assert f" level=warning event=volume_refused_test name=web token={token} flag=true" in line
    (entry,) = read_journal(f"TOKEN={token}")
    assert entry["SYSLOG_IDENTIFIER"] == "personalityd"
    assert entry["PRIORITY"] == "4"
    assert entry["NAME"] == "web"
    assert entry["FLAG"] == "1"
    assert entry["ODD_KEY"] == "1"
    assert entry["MESSAGE"] == f"volume_refused_test name=web token={token} flag=1 odd-key=1"


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters_and_stdlib_records(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    log_module.setup_logging("info", journal=False)
    logger = structlog.get_logger("test")
    logger.debug("hidden_event")
    logger.info("shown_event", device="/dev/loop3", message="two words")
    logging.getLogger("dbus_fast.test").warning("library said %s", "hi")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2
    assert 'event=shown_event device=/dev/loop3 message="two words"' in lines[0]
    assert 'level=warning event="library said hi" logger=dbus_fast.test' in lines[1]
    with pytest.raises(ValueError, match="unknown log level"):
        log_module.setup_logging("loud")


def test_stderr_is_journal() -> None:
    st = os.fstat(2)
    assert log_module.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not log_module.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not log_module.stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not log_module.stderr_is_journal({})


def test_journal_field_names() -> None:
    assert journal_field_name("device") == "DEVICE"
    assert journal_field_name("_private") == "PRIVATE"
    assert journal_field_name("message") == "FIELD_MESSAGE"
    assert journal_field_name("2nd") == "FIELD_2ND"
    assert journal_field_name("a-b.c") == "A_B_C"
