"""Who is on the bus: a caller's uid and groups, and a bus name's owner, asked of the bus
daemon itself (never of the caller)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Final

import structlog
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from personalityd.adapters.groups import lookup_user_gids
from personalityd.core.access import Caller
from personalityd.core.errors import AccessDenied
from personalityd.core.names import DBUS_BUS_NAME, DBUS_INTERFACE, DBUS_OBJECT_PATH, ERROR_FAILED
from personalityd.log import CallerLog

log = structlog.get_logger("personalityd.dbus")
refusals = CallerLog("personalityd.dbus")

# Bus calls the service makes itself (credentials, name owner) must not hang a request.
BUS_CALL_TIMEOUT: Final = 10.0
# The uids of the latest senders seen, for logging about them (`known_uid`).
_KNOWN_SENDERS: Final = 1024
_sender_uids: OrderedDict[str, int] = OrderedDict()


def known_uid(sender: str | None) -> int | None:
    """The uid the bus gave for `sender` when its credentials were last asked for, if any."""
    return _sender_uids.get(sender or "")


def _remember(sender: str, uid: int) -> None:
    _sender_uids[sender] = uid
    _sender_uids.move_to_end(sender)
    while len(_sender_uids) > _KNOWN_SENDERS:
        _sender_uids.popitem(last=False)


async def _bus_call(bus: MessageBus, member: str, signature: str, body: list[Any]) -> Message:
    msg = Message(
        destination=DBUS_BUS_NAME,
        path=DBUS_OBJECT_PATH,
        interface=DBUS_INTERFACE,
        member=member,
        signature=signature,
        body=body,
    )
    async with asyncio.timeout(BUS_CALL_TIMEOUT):
        reply = await bus.call(msg)
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name or ERROR_FAILED, str(reply.body[0] if reply.body else ""))
    return reply


async def caller_from_bus(bus: MessageBus, msg: Message) -> Caller:
    """The credentials of the sender of `msg`, asked of the bus daemon (never of the caller).

    GetConnectionCredentials gives the uid and, on dbus-daemon >= 1.10 and dbus-broker, the
    connection's real groups (UnixGroupIDs). Without UnixGroupIDs, the user's groups from the
    group database stand in (the process may have dropped some; it cannot have gained any).
    Raises AccessDenied when the bus cannot say who the caller is.
    """
    sender = msg.sender or ""
    try:
        reply = await _bus_call(bus, "GetConnectionCredentials", "s", [sender])
        creds: dict[str, Variant] = reply.body[0]
        uid_variant = creds.get("UnixUserID")
        if uid_variant is not None:
            uid = int(uid_variant.value)
        else:
            uid = int((await _bus_call(bus, "GetConnectionUnixUser", "s", [sender])).body[0])
    except (DBusError, TimeoutError) as exc:
        refusals.warning(None, "dbus_credentials_unavailable", sender=sender, error=str(exc))
        raise AccessDenied(f"cannot determine the credentials of {sender}") from None
    _remember(sender, uid)
    gids_variant = creds.get("UnixGroupIDs")
    if gids_variant is not None:
        gids = frozenset(int(g) for g in gids_variant.value)
    else:
        gids = await lookup_user_gids(uid)
    pid_variant = creds.get("ProcessID")
    pid = f", pid {pid_variant.value}" if pid_variant is not None else ""
    return Caller(uid=uid, gids=gids, description=f"{sender} (uid {uid}{pid})")


async def describe_owner(bus: MessageBus, name: str) -> str:
    """`:1.5 (pid 123)` for the current owner of `name`, as far as the bus will say."""
    try:
        owner = str((await _bus_call(bus, "GetNameOwner", "s", [name])).body[0])
    except (DBusError, TimeoutError):
        return "another connection"
    try:
        pid = (await _bus_call(bus, "GetConnectionUnixProcessID", "s", [owner])).body[0]
    except (DBusError, TimeoutError):
        return owner
    return f"{owner} (pid {pid})"
