"""Every D-Bus name the service and its clients use: bus, object, interface, errors, signatures.

The error names come from core.errors, so D-Bus replies, spool result codes and CLI messages
never drift apart.
"""

from __future__ import annotations

import os
from typing import Annotated, Final

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature

from personalityd.core import errors

BUS_NAME: Final = "org.personalityd.personality1"
OBJECT_PATH: Final = "/org/personalityd/personality1"
INTERFACE: Final = "org.personalityd.personality1.Manager"

# What dbus-fast and libdbus use when $DBUS_SYSTEM_BUS_ADDRESS is unset.
DEFAULT_SYSTEM_BUS_ADDRESS: Final = "unix:path=/run/dbus/system_bus_socket"

# The bus itself, for credentials of callers.
DBUS_BUS_NAME: Final = "org.freedesktop.DBus"
DBUS_OBJECT_PATH: Final = "/org/freedesktop/DBus"
DBUS_INTERFACE: Final = "org.freedesktop.DBus"
PROPERTIES_INTERFACE: Final = "org.freedesktop.DBus.Properties"

# Errors. Domain errors carry their own D-Bus name; these are the names clients match on.
ERROR_NO_SUCH_PERSONALITY: Final = errors.NoSuchPersonality.dbus_name
ERROR_INCOMPATIBLE: Final = errors.Incompatible.dbus_name
ERROR_BUSY: Final = errors.Busy.dbus_name
ERROR_MOUNT_FAILED: Final = errors.MountFailed.dbus_name
ERROR_INVALID_NAME: Final = errors.InvalidName.dbus_name
ERROR_TIMEOUT: Final = errors.Timeout.dbus_name
ERROR_ACCESS_DENIED: Final = errors.AccessDenied.dbus_name  # org.freedesktop.DBus.Error.*
ERROR_INVALID_ARGS: Final = errors.InvalidRequest.dbus_name  # org.freedesktop.DBus.Error.*
ERROR_FAILED: Final = "org.freedesktop.DBus.Error.Failed"
# What a client sees when nobody owns BUS_NAME (no bus activation for us).
ERROR_SERVICE_UNKNOWN: Final = "org.freedesktop.DBus.Error.ServiceUnknown"
ERROR_NAME_HAS_NO_OWNER: Final = "org.freedesktop.DBus.Error.NameHasNoOwner"

# Signatures (DESIGN section 7).
SIG_PERSONALITY_LIST: Final = "a(sssss)"  # name, state, version, device, mount point
SIG_CONFLICT_LIST: Final = "a(ssasb)"  # path, winner, shadowed (top first), identical
SIG_OPTIONS: Final = "a{sv}"
SIG_NAMES: Final = "as"
SIG_STACK_CHANGED: Final = "tas"  # generation, attached (bottom first)

# Options of Attach/Detach/Switch and the variant signature each must have.
OPTION_TIMEOUT: Final = "timeout"  # u: seconds to wait for a missing volume
OPTION_FORCE: Final = "force"  # b: skip the compatibility check
OPTION_SIGNATURES: Final = {OPTION_TIMEOUT: "u", OPTION_FORCE: "b"}

# Typed signatures for dbus-fast (it reads the DBusSignature out of Annotated).
PersonalityRow = tuple[str, str, str, str, str]
ConflictRow = tuple[str, str, list[str], bool]
PersonalityList = Annotated[list[PersonalityRow], DBusSignature(SIG_PERSONALITY_LIST)]
ConflictList = Annotated[list[ConflictRow], DBusSignature(SIG_CONFLICT_LIST)]
Options = Annotated[dict[str, Variant], DBusSignature(SIG_OPTIONS)]
Names = Annotated[list[str], DBusSignature(SIG_NAMES)]
StackChangedArgs = Annotated[tuple[int, list[str]], DBusSignature(SIG_STACK_CHANGED)]
# A method without out arguments. Not `-> None`: with postponed annotations dbus-fast reads the
# string "None" as the Python value None instead of an empty signature.
NoResult = Annotated[None, DBusSignature("")]


def system_bus_address(explicit: str | None = None) -> str:
    """`explicit`, else $DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus socket."""
    return explicit or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS_ADDRESS
