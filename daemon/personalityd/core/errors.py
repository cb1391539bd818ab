"""Domain errors: each carries its D-Bus name and spool code, and the volume and cause as fields.

The message (`str()`) is the one line shown to the user. Code that needs to know which volume
failed reads `error.volume`, never the text.
"""

from __future__ import annotations

ERROR_PREFIX = "org.personalityd.personality1.Error."


class PersonalityError(Exception):
    """A failure a user can cause or observe."""

    code = "failed"  # spool result code (kebab case)
    dbus_name = "org.freedesktop.DBus.Error.Failed"

    def __init__(self, message: str, *, volume: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.message = message
        self.volume = volume  # the personality the error is about, when there is one
        self.cause = cause  # the underlying reason (an OS error's text, a unit's result...)

    def __str__(self) -> str:
        return self.message


class NoSuchPersonality(PersonalityError):
    code = "no-such-personality"
    dbus_name = ERROR_PREFIX + "NoSuchPersonality"


class Incompatible(PersonalityError):
    code = "incompatible"
    dbus_name = ERROR_PREFIX + "Incompatible"


class Busy(PersonalityError):
    code = "busy"
    dbus_name = ERROR_PREFIX + "Busy"


class Stopping(Busy):
    """Busy because the daemon is stopping: a spool request stays for the next start."""


class MountFailed(PersonalityError):
    code = "mount-failed"
    dbus_name = ERROR_PREFIX + "MountFailed"


class InternalError(MountFailed):
    """An unexpected exception inside a change: the caller learns only that it failed; the
    traceback goes to the daemon's log."""

    def __init__(self) -> None:
        super().__init__("internal error; the daemon's log has the details")


class InvalidName(PersonalityError):
    code = "invalid-name"
    dbus_name = ERROR_PREFIX + "InvalidName"


class Timeout(PersonalityError):
    code = "timeout"
    dbus_name = ERROR_PREFIX + "Timeout"


class RolledBack(PersonalityError):
    """A trial that was not confirmed: its generation was rolled back (the message says why)."""

    code = "rolled-back"
    dbus_name = ERROR_PREFIX + "RolledBack"


class NotSupported(PersonalityError):
    code = "not-supported"
    dbus_name = ERROR_PREFIX + "NotSupported"


class AccessDenied(PersonalityError):
    code = "access-denied"
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class InvalidRequest(PersonalityError):
    code = "invalid-request"
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class ConfigError(Exception):
    """A config file the daemon refuses to start with; names file, key and expected form."""
