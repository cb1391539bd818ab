"""The systemd journal: structured entries with our MESSAGE_IDs (DESIGN section 5).

Sending never raises. When journald is not there (socket missing, or sendv failing because
journald stopped), the first failure is logged once through structlog and entries are dropped;
every send checks again (one stat), so entries flow again as soon as journald is back.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence

import structlog

from personalityd.core import messages
from personalityd.core.conflicts import conflict_message
from personalityd.core.model import Conflict

Sendv = Callable[..., object]


def _load_sendv() -> Callable[..., object] | None:
    try:
        from systemd.journal import sendv
    except ImportError:  # systemd-python missing: run without the journal
        return None
    function: Callable[..., object] = sendv
    return function


_sendv = _load_sendv()

JOURNAL_SOCKET = "/run/systemd/journal/socket"

PRIORITY_ERR = 3
PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5
PRIORITY_INFO = 6

FieldValue = str | int | Sequence[str]

log = structlog.get_logger(__name__)


def journal_socket_present(socket_path: str = JOURNAL_SOCKET) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError:
        return False


def encode_fields(fields: Mapping[str, FieldValue]) -> list[bytes]:
    """`KEY=value` items for sendv: keys upper-cased, a sequence repeats its key once per item,
    bools become 0/1 and ints decimal. Text is UTF-8; undecodable path bytes (surrogate
    escapes) are passed through as the original bytes."""
    items: list[bytes] = []
    for key, value in fields.items():
        name = key.upper()
        if isinstance(value, str):
            items.append(_item(name, value))
        elif isinstance(value, bool):
            items.append(_item(name, "1" if value else "0"))
        elif isinstance(value, int):
            items.append(_item(name, str(value)))
        else:
            items.extend(_item(name, item) for item in value)
    return items


def _item(name: str, value: str) -> bytes:
    return f"{name}={value}".encode("utf-8", "surrogateescape")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Journal:
    """Sends our journal entries. One instance per daemon."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, sendv: Sendv | None = None) -> None:
        self.socket_path = socket_path
        self._sendv = sendv if sendv is not None else _sendv
        self._available = True  # what we last told the log

    @property
    def available(self) -> bool:
        return self._available

    def send(
        self,
        message: str,
        message_id: str,
        priority: int,
        fields: Mapping[str, FieldValue],
    ) -> bool:
        """Send one entry; True when it was handed to journald. Never raises."""
        if self._sendv is None:
            self._unavailable("systemd-python is not installed")
            return False
        if not journal_socket_present(self.socket_path):
            self._unavailable(f"{self.socket_path} is missing")
            return False
        items = [
            _item("MESSAGE", message),
            _item("MESSAGE_ID", message_id),
            _item("PRIORITY", str(priority)),
            _item("SYSLOG_IDENTIFIER", messages.SYSLOG_IDENTIFIER),
            *encode_fields(fields),
        ]
        try:
            self._sendv(*items)
        except (OSError, ValueError) as e:
            self._unavailable(str(e))
            return False
        if not self._available:
            self._available = True
            log.info("journal_available", socket=self.socket_path)
        return True

    def _unavailable(self, reason: str) -> None:
        if self._available:
            self._available = False
            log.warning("journal_unavailable", socket=self.socket_path, reason=reason)

    # The DESIGN section 5 entries.

    def conflict(self, c: Conflict, generation: int) -> bool:
        return self.send(
            conflict_message(c),
            messages.MESSAGE_ID_CONFLICT,
            PRIORITY_WARNING,
            {
                "PERSONALITY_PATH": c.path,
                "PERSONALITY_WINNER": c.winner,
                "PERSONALITY_SHADOWED": c.shadowed,
                "PERSONALITY_IDENTICAL": c.identical,
                "PERSONALITY_HIERARCHY": c.hierarchy,
                "PERSONALITY_GENERATION": generation,
            },
        )

    def stack_changed(
        self,
        generation: int,
        attached: Sequence[str],
        conflicts: int,
        overrides: int,
        left_out: int = 0,
    ) -> bool:
        """The summary entry; `attached` bottom first, `left_out` conflicts not sent singly."""
        stack = " ".join(attached) if attached else "no personalities"
        counts = f"{_plural(conflicts, 'conflict')}, {_plural(overrides, 'override')}"
        if left_out > 0:
            counts += f"; {left_out} not logged singly"
        fields: dict[str, FieldValue] = {
            "PERSONALITY_GENERATION": generation,
            "PERSONALITY_ATTACHED": " ".join(attached),
            "PERSONALITY_CONFLICTS": conflicts,
            "PERSONALITY_OVERRIDES": overrides,
        }
        if left_out > 0:
            fields["PERSONALITY_CONFLICTS_LEFT_OUT"] = left_out
        return self.send(
            f"Stack generation {generation}: {stack} ({counts})",
            messages.MESSAGE_ID_STACK_CHANGED,
            PRIORITY_NOTICE,
            fields,
        )

    def volume_refused(self, device: str, name: str | None, reason: str) -> bool:
        fields: dict[str, FieldValue] = {"PERSONALITY_DEVICE": device}
        if name is not None:
            fields["PERSONALITY_NAME"] = name
        fields["PERSONALITY_REASON"] = reason
        what = f"Volume {device}" + (f" ('{name}')" if name is not None else "")
        return self.send(
            f"{what} refused: {reason}",
            messages.MESSAGE_ID_VOLUME_REFUSED,
            PRIORITY_ERR,
            fields,
        )

    def change_failed(self, requested: str, reason: str) -> bool:
        return self.send(
            f"Stack change '{requested}' failed and was rolled back: {reason}",
            messages.MESSAGE_ID_CHANGE_FAILED,
            PRIORITY_ERR,
            {"PERSONALITY_REQUESTED": requested, "PERSONALITY_REASON": reason},
        )

    def report_stack(
        self,
        generation: int,
        attached: Sequence[str],
        conflicts: Sequence[Conflict],
        overrides: int,
    ) -> None:
        """One entry per conflict (the first MAX_CONFLICT_ENTRIES), then the summary."""
        limit = messages.MAX_CONFLICT_ENTRIES
        for c in conflicts[:limit]:
            self.conflict(c, generation)
        self.stack_changed(
            generation, attached, len(conflicts), overrides, max(0, len(conflicts) - limit)
        )
