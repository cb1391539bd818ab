"""Every name the project fixes: personality names, hierarchy keys, and the D-Bus names.

The D-Bus error names come from core.errors, so D-Bus replies, spool result codes and CLI
messages never drift apart.
"""

from __future__ import annotations

import re
from typing import Final

from personalityd.core import errors
from personalityd.core.errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def check_name(name: str) -> str:
    """Return `name` if it is a valid personality name, else raise InvalidName saying why."""
    if is_valid_name(name):
        return name
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise InvalidName(
        f"invalid personality name {shown!r}: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"
    )


def hierarchy_key(hierarchy: str) -> str:
    """`/usr` -> `_usr`, `/usr/local` -> `_usr_local`: the hierarchy as one path component."""
    return hierarchy.rstrip("/").replace("/", "_")


# -- D-Bus (the API of the Manager interface) -------------------------------------------

BUS_NAME: Final = "org.personalityd.personality1"
OBJECT_PATH: Final = "/org/personalityd/personality1"
INTERFACE: Final = "org.personalityd.personality1.Manager"

# The bus itself, for credentials of callers.
DBUS_BUS_NAME: Final = "org.freedesktop.DBus"
DBUS_OBJECT_PATH: Final = "/org/freedesktop/DBus"
DBUS_INTERFACE: Final = "org.freedesktop.DBus"
PROPERTIES_INTERFACE: Final = "org.freedesktop.DBus.Properties"

# Errors. Domain errors carry their own D-Bus name (core/errors.py); these are the others.
ERROR_INVALID_ARGS: Final = errors.InvalidRequest.dbus_name
ERROR_FAILED: Final = "org.freedesktop.DBus.Error.Failed"
# What a client sees when nobody owns BUS_NAME (no bus activation for us).
ERROR_SERVICE_UNKNOWN: Final = "org.freedesktop.DBus.Error.ServiceUnknown"
ERROR_NAME_HAS_NO_OWNER: Final = "org.freedesktop.DBus.Error.NameHasNoOwner"

# Signatures of the Manager interface.
SIG_PERSONALITY_LIST: Final = "a(sssss)"  # name, state, version, device, mount point
SIG_CONFLICT_LIST: Final = "a(ssasb)"  # path, winner, shadowed (top first), identical
SIG_OPTIONS: Final = "a{sv}"
SIG_NAMES: Final = "as"
SIG_STACK_CHANGED: Final = "tas"  # generation, attached (bottom first)

# Options of Attach/Detach/Switch and the variant signature each must have.
OPTION_TIMEOUT: Final = "timeout"  # u: seconds to wait for a missing volume
OPTION_FORCE: Final = "force"  # b: skip the compatibility check
# b (Detach): the ExecStop of personality@NAME.service (docs/system.md)
OPTION_FROM_UNIT: Final = "from_unit"
OPTION_CONFIRM: Final = "confirm"  # u: trial length in seconds (0: no trial)
OPTION_CONFIRM_MODE: Final = "confirm_mode"  # s: "auto" or "manual"
OPTION_DATA: Final = "data"  # b: Rollback also returns the upper's data (btrfs)
OPTION_SIGNATURES: Final = {
    OPTION_TIMEOUT: "u",
    OPTION_FORCE: "b",
    OPTION_FROM_UNIT: "b",
    OPTION_CONFIRM: "u",
    OPTION_CONFIRM_MODE: "s",
    OPTION_DATA: "b",
}
SIG_GENERATION_LIST: Final = "a(tastss)"  # generation, desired, realtime usec, status, cause
