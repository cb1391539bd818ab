"""Persisted state and atomic JSON files: round trip, corrupt files, failing writes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from personalityd.adapters.state import (
    PersistedState,
    StateFileError,
    load_state,
    save_state,
    write_conflict_report,
    write_json_atomic,
)
from personalityd.core.history import CONFIRMED, TRIAL, Generation, TrialRecord
from personalityd.core.model import Conflict, ConflictReport, DesiredEntry, Mask

DAEMON_DIR = Path(__file__).resolve().parents[2] / "daemon"

STATE = PersistedState(
    desired=(DesiredEntry("base-tools"), DesiredEntry("web", force=True)), generation=7
)


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert load_state(tmp_path) == PersistedState(desired=(), generation=0)


def test_round_trip(tmp_path: Path) -> None:
    save_state(tmp_path, STATE)
    assert load_state(tmp_path) == STATE
    path = tmp_path / "state.json"
    assert json.loads(path.read_text()) == {
        "version": 2,
        "generation": 7,
        "desired": [{"name": "base-tools", "force": False}, {"name": "web", "force": True}],
        "history": [],
        "trial": None,
        "upper_data": None,
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left


def test_save_replaces(tmp_path: Path) -> None:
    save_state(tmp_path, STATE)
    newer = PersistedState(desired=(DesiredEntry("web"),), generation=8)
    save_state(tmp_path, newer)
    assert load_state(tmp_path) == newer
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not a JSON state file"),
        (b"\xff\xfe", "not a JSON state file"),
        (b"", "not a JSON state file"),
        (b"[]", "expected a JSON object"),
        (b'{"generation": -1, "desired": []}', "'generation' must be a non-negative integer"),
        (b'{"generation": true, "desired": []}', "'generation' must be a non-negative integer"),
        (b'{"generation": 1}', "'desired' must be a list"),
        (b'{"generation": 1, "desired": ["web"]}', "'desired'[0] must be an object"),
        (b'{"generation": 1, "desired": [{"name": "../x"}]}', "invalid personality name"),
        (b'{"generation": 1, "desired": [{"name": "w", "force": 1}]}', "'force' must be"),
        (b'{"generation": 1, "desired": [{"name": "w"}, {"name": "w"}]}', "listed twice"),
        (b'{"version": 9, "generation": 1, "desired": []}', "unsupported version 9"),
    ],
)
def test_corrupt_file_is_an_error_naming_it(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError) as info:
        load_state(tmp_path)
    assert str(path) in str(info.value)
    assert why in str(info.value)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failing_write_leaves_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    save_state(tmp_path, STATE)
    before = (tmp_path / "state.json").read_bytes()

    def enospc(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, enospc)
    with pytest.raises(OSError) as info:
        save_state(tmp_path, PersistedState(desired=(), generation=8))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "state.json").read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_full_filesystem_leaves_old_file(tmp_path: Path) -> None:
    """A real ENOSPC: a 1 MiB tmpfs in a private mount namespace (gone with the process)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    script = textwrap.dedent(
        """
        import errno, os, sys
        from pathlib import Path
        from personalityd.adapters.state import PersistedState, load_state, save_state
        from personalityd.core.model import DesiredEntry

        directory = Path(sys.argv[1])
        old = PersistedState(desired=(DesiredEntry("web"),), generation=1)
        save_state(directory, old)
        before = (directory / "state.json").read_bytes()
        with open(directory / "filler", "wb", buffering=0) as filler:  # fill it up
            try:
                while True:
                    filler.write(b"\\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        names = tuple(DesiredEntry(f"p{i:05d}") for i in range(2000))
        try:
            save_state(directory, PersistedState(desired=names, generation=2))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        else:
            sys.exit("save_state did not fail on a full filesystem")
        assert (directory / "state.json").read_bytes() == before
        assert load_state(directory) == old
        assert sorted(os.listdir(directory)) == ["filler", "state.json"], os.listdir(directory)
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(DAEMON_DIR))
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1M tmpfs "$1" && exec "$2" -c "$3" "$1"',
            "sh",
            str(mountpoint),
            sys.executable,
            script,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert os.listdir(mountpoint) == []  # the tmpfs went away with the namespace


def test_write_json_atomic_failing_rename_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})

    def failing_rename(src: str, dst: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        write_json_atomic(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_conflict_report(tmp_path: Path) -> None:
    report = ConflictReport(
        conflicts=(
            Conflict("/usr/bin/tool", "/usr", "web", ("datascience", "base-tools"), False),
            Conflict("/etc/motd", "/etc", "web", ("base-tools",), True),
        ),
        overrides=3,
        masks=(
            Mask("/usr/share/doc", "/usr", "web", "hidden"),
            Mask("/etc/motd", "/etc", "base-tools", "deleted"),
        ),
    )
    write_conflict_report(tmp_path, 7, ["base-tools", "datascience", "web"], report)
    assert json.loads((tmp_path / "conflicts.json").read_text()) == {
        "generation": 7,
        "attached": ["base-tools", "datascience", "web"],
        "overrides": 3,
        "conflicts": [
            {
                "path": "/usr/bin/tool",
                "hierarchy": "/usr",
                "winner": "web",
                "shadowed": ["datascience", "base-tools"],
                "identical": False,
            },
            {
                "path": "/etc/motd",
                "hierarchy": "/etc",
                "winner": "web",
                "shadowed": ["base-tools"],
                "identical": True,
            },
        ],
        "masks": [
            {"path": "/usr/share/doc", "hierarchy": "/usr", "name": "web", "mask": "hidden"},
            {"path": "/etc/motd", "hierarchy": "/etc", "name": "base-tools", "mask": "deleted"},
        ],
    }


def test_conflict_report_without_masks_lists_none(tmp_path: Path) -> None:
    write_conflict_report(tmp_path, 1, [], ConflictReport((), 0))
    assert json.loads((tmp_path / "conflicts.json").read_text())["masks"] == []


def test_version_1_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(
        '{"version": 1, "generation": 7, "desired": [{"name": "web", "force": false}]}'
    )
    assert load_state(tmp_path) == PersistedState(desired=(DesiredEntry("web"),), generation=7)


def test_history_and_trial_round_trip(tmp_path: Path) -> None:
    desired = (DesiredEntry("base"), DesiredEntry("web", force=True))
    state = PersistedState(
        desired=desired,
        generation=9,
        history=(
            Generation(8, desired[:1], 1_700_000_000_000_000, CONFIRMED, "dbus"),
            Generation(9, desired, 1_700_000_001_000_000, TRIAL, "spool"),
        ),
        trial=TrialRecord(9, 8, 1_700_000_031_000_000, manual=True, origins=("web.json",)),
        upper_data="live/9",
    )
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"history": {}}, "'history' must be a list"),
        ({"history": [{"generation": 1, "desired": [], "realtime_usec": 0, "status": "maybe",
                       "cause": "dbus"}]}, "'status' must be one of"),
        ({"history": [{"generation": 1, "desired": [], "realtime_usec": 0,
                       "status": "trial", "cause": "cron"}]}, "'cause' must be one of"),
        ({"trial": {"generation": 1, "rollback_to": -1, "deadline_usec": 0}}, "rollback_to"),
        ({"trial": {"generation": 1, "rollback_to": 0, "deadline_usec": 0, "origins": [1]}},
         "'origins'"),
        ({"upper_data": 5}, "'upper_data'"),
    ],
)
def test_bad_history_or_trial_is_refused(
    tmp_path: Path, extra: dict[str, object], why: str
) -> None:
    body = {"version": 2, "generation": 1, "desired": [], **extra}
    (tmp_path / "state.json").write_text(json.dumps(body))
    with pytest.raises(StateFileError, match=re.escape(why)):
        load_state(tmp_path)
