"""personalityctl's connection to personalityd: method calls on the Manager object over D-Bus,
with every D-Bus error turned into a one-line CliError."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from personalityd.adapters.bus import system_bus_address
from personalityd.core.names import (
    BUS_NAME,
    ERROR_FAILED,
    ERROR_NAME_HAS_NO_OWNER,
    ERROR_SERVICE_UNKNOWN,
    INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)

READ_TIMEOUT: Final = 25.0  # seconds for a reading call, as sd-bus's default
UNREACHABLE: Final = "cannot reach personalityd on the system bus"
# The standard names of what a client meets before any answer, for `--json` failures.
ERROR_NO_SERVER: Final = "org.freedesktop.DBus.Error.NoServer"
ERROR_NO_REPLY: Final = "org.freedesktop.DBus.Error.NoReply"
ERROR_DISCONNECTED: Final = "org.freedesktop.DBus.Error.Disconnected"
ERROR_UNKNOWN_METHOD: Final = "org.freedesktop.DBus.Error.UnknownMethod"


class CliError(Exception):
    """The operation failed; `str()` is the one line printed after `personalityctl: `.

    `error_name` is the D-Bus error name of the failure (the daemon's, or the standard one
    for a bus that cannot be reached or a call without an answer); `message` is the daemon's
    own text where there is one."""

    def __init__(self, text: str, error_name: str = ERROR_FAILED, message: str | None = None):
        super().__init__(text)
        self.error_name = error_name
        self.message = text if message is None else message


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Client:
    """Method calls on the Manager object, with D-Bus errors turned into CliError."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    @classmethod
    async def connect(cls, address: str | None) -> Client:
        resolved = system_bus_address(address)
        try:
            bus = await asyncio.wait_for(
                MessageBus(bus_address=resolved, bus_type=BusType.SYSTEM).connect(),
                READ_TIMEOUT,
            )
        except TimeoutError:
            raise CliError(
                f"{UNREACHABLE}: {resolved}: connection timed out", ERROR_NO_SERVER
            ) from None
        except Exception as exc:
            raise CliError(
                f"{UNREACHABLE}: {resolved}: {_one_line(str(exc))}", ERROR_NO_SERVER
            ) from None
        return cls(bus)

    def disconnect(self) -> None:
        self._bus.disconnect()

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        interface: str = INTERFACE,
        timeout: float = READ_TIMEOUT,
    ) -> list[Any]:
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), timeout)
        except TimeoutError:
            raise CliError(
                f"no answer from personalityd to {member} after {timeout:g}s", ERROR_NO_REPLY
            ) from None
        except Exception as exc:  # the connection broke
            raise CliError(f"{UNREACHABLE}: {_one_line(str(exc))}", ERROR_DISCONNECTED) from None
        if reply.message_type is MessageType.ERROR:
            name = str(reply.error_name)
            text = _one_line(str(reply.body[0])) if reply.body else name
            if name in (ERROR_SERVICE_UNKNOWN, ERROR_NAME_HAS_NO_OWNER):
                raise CliError(f"{UNREACHABLE}: {text}", name)
            raise CliError(text, name)
        return list(reply.body)

    async def properties(self) -> dict[str, Any]:
        (values,) = await self.call("GetAll", "s", [INTERFACE], interface=PROPERTIES_INTERFACE)
        return {key: variant.value for key, variant in values.items()}


# -- output -----------------------------------------------------------------------------------
