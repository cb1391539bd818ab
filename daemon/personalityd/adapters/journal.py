"""The systemd journal: the one path to it, and the entries with our MESSAGE_IDs.

`send_items` is the only place that calls sd_journal_sendv; `encode_fields` the only place
that turns fields into journal items. The log (log.py) and the `Journal` entries both use them.

`Journal.send` never raises. When journald is not there (socket missing, or sendv failing because
journald stopped), the first failure is logged once through structlog and entries are dropped;
every send checks again (one stat), so entries flow again as soon as journald is back.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from personalityd.core import messages
from personalityd.core.messages import (
    SYSLOG_IDENTIFIER,
    conflict_message,
    mask_message,
    orphan_message,
)
from personalityd.core.model import Conflict, ConflictReport, Mask
from personalityd.core.orphans import Orphan

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

FieldValue = str | int | Sequence[str]

# Field names journald accepts: upper case, digits, underscore; not starting with _ or a digit.
_BAD_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_OWN_FIELDS = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"})

log = structlog.get_logger(__name__)


def journal_socket_present(socket_path: str = JOURNAL_SOCKET) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError:
        return False


def journal_field_name(key: str) -> str:
    """A key as a journal field name: `device` -> `DEVICE`, `odd-key` -> `ODD_KEY`; never one
    of the fields every entry sets itself."""
    name = _BAD_FIELD_CHARS.sub("_", key.upper()).lstrip("_")[:64] or "FIELD"
    if name[0].isdigit() or name in _OWN_FIELDS:
        name = ("FIELD_" + name)[:64]
    return name


def sendv_available() -> bool:
    return _sendv is not None


def send_items(
    message: str,
    priority: int,
    items: Sequence[bytes],
    message_id: str = "",
    sendv: Sendv | None = None,
) -> None:
    """Hand one entry to journald: MESSAGE, MESSAGE_ID (if any), PRIORITY, our
    SYSLOG_IDENTIFIER, then `items`. Raises OSError or ValueError; silently nothing without
    systemd-python. `sendv` replaces sd_journal_sendv (tests)."""
    sendv = sendv or _sendv
    if sendv is None:
        return
    head = [_item("MESSAGE", message)]
    if message_id:
        head.append(_item("MESSAGE_ID", message_id))
    head += [_item("PRIORITY", str(priority)), _item("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER)]
    sendv(*head, *items)


def encode_fields(fields: Mapping[str, FieldValue | bool]) -> list[bytes]:
    """`KEY=value` items for sendv: keys as journal field names, a sequence repeats its key
    once per item, bools become 0/1 and ints decimal. Text is UTF-8; undecodable path bytes
    (surrogate escapes) are passed through as the original bytes. Other values: their str."""
    items: list[bytes] = []
    for key, value in fields.items():
        name = journal_field_name(key)
        if isinstance(value, str):
            items.append(_item(name, value))
        elif isinstance(value, bool):
            items.append(_item(name, "1" if value else "0"))
        elif isinstance(value, int):
            items.append(_item(name, str(value)))
        elif isinstance(value, list | tuple):
            items.extend(_item(name, str(item)) for item in value)
        else:
            items.append(_item(name, str(value)))
    return items


def _item(name: str, value: str) -> bytes:
    return f"{name}={value}".encode("utf-8", "surrogateescape")


def _local_time(realtime_usec: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(realtime_usec / 1_000_000))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Journal:
    """Sends our journal entries. One instance per daemon."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, sendv: Sendv | None = None) -> None:
        self.socket_path = socket_path
        self._sendv = sendv  # tests substitute one; else send_items
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
        if self._sendv is None and not sendv_available():
            self._unavailable("systemd-python is not installed")
            return False
        if not journal_socket_present(self.socket_path):
            self._unavailable(f"{self.socket_path} is missing")
            return False
        try:
            send_items(message, priority, encode_fields(fields), message_id, self._sendv)
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

    # Our entries (docs/journal.md).

    def conflict(self, c: Conflict, generation: int) -> bool:
        return self.send(
            conflict_message(c),
            messages.MESSAGE_ID_CONFLICT,
            PRIORITY_WARNING,
            {
                "PERSONALITY_PATH": c.path,
                "PERSONALITY_WINNER": c.winner,
                "PERSONALITY_SHADOWED": c.shadowed,
                # journald does not keep the order of a repeated field: this one does.
                "PERSONALITY_STACK": " ".join((c.winner, *c.shadowed)),
                "PERSONALITY_IDENTICAL": c.identical,
                "PERSONALITY_HIERARCHY": c.hierarchy,
                "PERSONALITY_GENERATION": generation,
            },
        )

    def mask(self, m: Mask, generation: int) -> bool:
        return self.send(
            mask_message(m),
            messages.MESSAGE_ID_MASK,
            PRIORITY_NOTICE,
            {
                "PERSONALITY_PATH": m.path,
                "PERSONALITY_NAME": m.name,
                "PERSONALITY_MASK": m.mask,
                "PERSONALITY_HIERARCHY": m.hierarchy,
                "PERSONALITY_GENERATION": generation,
            },
        )

    def orphan_moved(self, o: Orphan, generation: int, on_volume: str) -> bool:
        return self.send(
            orphan_message(o, on_volume),
            messages.MESSAGE_ID_ORPHAN,
            PRIORITY_NOTICE,
            {
                "PERSONALITY_PATH": o.path,
                "PERSONALITY_NAME": o.name,
                "PERSONALITY_GENERATION": generation,
                "PERSONALITY_HIERARCHY": o.hierarchy,
                "PERSONALITY_ORPHAN": on_volume,
            },
        )

    def stack_changed(
        self,
        generation: int,
        attached: Sequence[str],
        conflicts: int,
        overrides: int,
        left_out: int = 0,
        masks: int = 0,
        masks_left_out: int = 0,
    ) -> bool:
        """The summary entry; `attached` bottom first, `left_out` conflicts and
        `masks_left_out` masks not sent singly."""
        stack = " ".join(attached) if attached else "no personalities"
        counts = ", ".join(
            (
                _plural(conflicts, "conflict"),
                _plural(overrides, "override"),
                _plural(masks, "mask"),
            )
        )
        if left_out > 0:
            counts += f"; {left_out} not logged singly"
        if masks_left_out > 0:
            counts += f"; {masks_left_out} masks not logged singly"
        fields: dict[str, FieldValue] = {
            "PERSONALITY_GENERATION": generation,
            "PERSONALITY_ATTACHED": " ".join(attached),
            "PERSONALITY_CONFLICTS": conflicts,
            "PERSONALITY_OVERRIDES": overrides,
            "PERSONALITY_MASKS": masks,
        }
        if left_out > 0:
            fields["PERSONALITY_CONFLICTS_LEFT_OUT"] = left_out
        if masks_left_out > 0:
            fields["PERSONALITY_MASKS_LEFT_OUT"] = masks_left_out
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

    def declaration_failed(
        self, personality: str, tool: str, command: str, reason: str, generation: int
    ) -> bool:
        """A personality's declaration that its tool failed to apply (the stack stays)."""
        whose = f" of '{personality}'" if personality else ""
        return self.send(
            f"Declarations{whose} not applied at generation {generation}: {reason}",
            messages.MESSAGE_ID_DECLARATION_FAILED,
            PRIORITY_ERR,
            {
                "PERSONALITY_NAME": personality,
                "PERSONALITY_TOOL": tool,
                "PERSONALITY_COMMAND": command,
                "PERSONALITY_REASON": reason,
                "PERSONALITY_GENERATION": generation,
            },
        )

    def trial_started(self, generation: int, deadline_usec: int, manual: bool) -> bool:
        until = _local_time(deadline_usec)
        needs = "its checks and a Confirm" if manual else "its checks"
        return self.send(
            f"Generation {generation} is on trial until {until}: it needs {needs} by then, "
            "or it is rolled back",
            messages.MESSAGE_ID_TRIAL_STARTED,
            PRIORITY_NOTICE,
            {"PERSONALITY_GENERATION": generation, "PERSONALITY_DEADLINE": deadline_usec},
        )

    def trial_confirmed(self, generation: int) -> bool:
        return self.send(
            f"Generation {generation} is confirmed",
            messages.MESSAGE_ID_TRIAL_CONFIRMED,
            PRIORITY_NOTICE,
            {"PERSONALITY_GENERATION": generation},
        )

    def rolled_back(self, generation: int, rolled_back_to: int, new: int, reason: str) -> bool:
        return self.send(
            f"Generation {generation} was rolled back ({reason}): generation {new} has the "
            f"stack of generation {rolled_back_to}",
            messages.MESSAGE_ID_ROLLED_BACK,
            PRIORITY_WARNING,
            {
                "PERSONALITY_GENERATION": generation,
                "PERSONALITY_ROLLED_BACK_TO": rolled_back_to,
                "PERSONALITY_NEW_GENERATION": new,
                "PERSONALITY_REASON": reason,
            },
        )

    def report_stack(
        self, generation: int, attached: Sequence[str], report: ConflictReport
    ) -> None:
        """One entry per conflict and one per mask (the first MAX_CONFLICT_ENTRIES of each),
        then the summary."""
        limit = messages.MAX_CONFLICT_ENTRIES
        conflicts, masks = report.conflicts, report.masks
        for c in conflicts[:limit]:
            self.conflict(c, generation)
        for m in masks[:limit]:
            self.mask(m, generation)
        self.stack_changed(
            generation,
            attached,
            len(conflicts),
            report.overrides,
            max(0, len(conflicts) - limit),
            masks=len(masks),
            masks_left_out=max(0, len(masks) - limit),
        )
