"""Where the system bus is: the one environment lookup the D-Bus service and client share."""

from __future__ import annotations

import os
from typing import Final

# What dbus-fast and libdbus use when $DBUS_SYSTEM_BUS_ADDRESS is unset.
DEFAULT_SYSTEM_BUS_ADDRESS: Final = "unix:path=/run/dbus/system_bus_socket"


def system_bus_address(explicit: str | None = None) -> str:
    """`explicit`, else $DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus socket."""
    return explicit or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS_ADDRESS
