"""Logging: structlog events as logfmt lines on stderr, and natively to the journal.

Events are stable snake_case names with fields: `log.info("volume_mounted", name=..., device=...)`
becomes `timestamp=... level=info event=volume_mounted name=web device=/dev/loop3` on stderr.

When journald is there and stderr is not already connected to it (`JOURNAL_STREAM`, as set by
systemd for units logging to the journal, names the device and inode of stderr), each event is
also sent as a native journal entry: MESSAGE = the event and its fields as key=value, every
field upper-cased (`NAME=web`), PRIORITY from the level, SYSLOG_IDENTIFIER=personalityd.
Journal failures are dropped silently here: the logger cannot log about itself, and stderr
still has every line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

from personalityd.adapters.journal import Sendv, encode_fields, send_items, sendv_available
from personalityd.core.ratelimit import RateLimit

JOURNAL_SOCKET = "/run/systemd/journal/socket"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# structlog method name -> syslog priority.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}

# Keys the renderer puts first, and the journal sender does not repeat as fields.
_HEAD_KEYS = ("timestamp", "level", "event")

EventDict = MutableMapping[str, Any]


def stderr_is_journal(environ: MutableMapping[str, str] | None = None) -> bool:
    """True when fd 2 is the journal stream systemd connected us to (`JOURNAL_STREAM`)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


class JournalSender:
    """A structlog processor that sends each event to the journal and passes it on unchanged."""

    def __init__(self, sendv: Sendv | None = None) -> None:
        self._sendv = sendv  # tests substitute one; else adapters/journal.py's

    def __call__(self, _logger: object, method_name: str, event_dict: EventDict) -> EventDict:
        fields = {k: v for k, v in event_dict.items() if k not in _HEAD_KEYS}
        event = str(event_dict.get("event", ""))
        message = " ".join([event, *(f"{k}={_text(v)}" for k, v in fields.items())])
        level = str(event_dict.get("level", method_name))
        # If journald went away, the line is still on stderr.
        with contextlib.suppress(OSError, ValueError):
            send_items(message, PRIORITIES.get(level, 6), encode_fields(fields), sendv=self._sendv)
        return event_dict


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class _StdlibBridge(logging.Handler):
    """Routes records of libraries using `logging` (dbus-fast, asyncio) through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            logger.log(record.levelno, record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "info", *, journal: bool | None = None) -> None:
    """Configure structlog (and the stdlib root logger) for the daemon.

    `journal`: send events natively to the journal; None (default) decides by itself: yes when
    the journal socket is there and stderr is not already the journal.
    """
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}"
        ) from None
    if journal is None:
        journal = sendv_available() and os.path.exists(JOURNAL_SOCKET) and not stderr_is_journal()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if journal:
        processors.append(JournalSender())
    processors.append(
        structlog.processors.LogfmtRenderer(
            key_order=list(_HEAD_KEYS), drop_missing=True, bool_as_flag=False
        )
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(threshold)


class CallerLog:
    """Log lines that a caller causes (a refused call or request): root's are always
    written; other users' are rate-limited per uid (core/ratelimit.py), so no user can flood
    the journal. The first line written after some were dropped says how many (`dropped`)."""

    def __init__(self, name: str, limit: RateLimit | None = None) -> None:
        self._log = structlog.get_logger(name)
        self._limit = limit or RateLimit()

    def warning(self, uid: int | None, event: str, **fields: Any) -> None:
        self._emit("warning", uid, event, fields)

    def info(self, uid: int | None, event: str, **fields: Any) -> None:
        self._emit("info", uid, event, fields)

    def _emit(self, level: str, uid: int | None, event: str, fields: dict[str, Any]) -> None:
        if uid != 0:
            verdict = self._limit.check(uid, time.monotonic())
            if not verdict.allowed:
                return
            if verdict.suppressed:
                fields = {**fields, "dropped": verdict.suppressed}
        getattr(self._log, level)(event, **fields)
