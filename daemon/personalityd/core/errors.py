"""Domain errors, and the one table that maps each to its D-Bus name and spool code."""

from __future__ import annotations

ERROR_PREFIX = "org.personalityd.personality1.Error."


class PersonalityError(Exception):
    """A failure a user can cause or observe; `str()` is the one-line message shown to them."""

    code = "failed"  # spool result code (kebab case)
    dbus_name = "org.freedesktop.DBus.Error.Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

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


class MountFailed(PersonalityError):
    code = "mount-failed"
    dbus_name = ERROR_PREFIX + "MountFailed"


class InvalidName(PersonalityError):
    code = "invalid-name"
    dbus_name = ERROR_PREFIX + "InvalidName"


class Timeout(PersonalityError):
    code = "timeout"
    dbus_name = ERROR_PREFIX + "Timeout"


class AccessDenied(PersonalityError):
    code = "access-denied"
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class InvalidRequest(PersonalityError):
    code = "invalid-request"
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class ConfigError(Exception):
    """A config file the daemon refuses to start with; names file, key and expected form."""


ERROR_TYPES: tuple[type[PersonalityError], ...] = (
    NoSuchPersonality,
    Incompatible,
    Busy,
    MountFailed,
    InvalidName,
    Timeout,
    AccessDenied,
    InvalidRequest,
)
