"""The org.personalityd.personality1.Manager interface: a thin layer over api.ManagerAPI.

It converts D-Bus arguments to domain calls and domain errors to D-Bus errors, finds out who
is calling (uid and groups, from the bus daemon), and turns the manager's stack events into
signals. It decides nothing itself: whether the caller may change the stack is the manager's
one decision (core/access.py).

How the caller is known: dbus-fast (5.x) gives a service method only its arguments, never the
message, and has no supported accessor for the sender. It does document message handlers
(`MessageBus.add_message_handler`): they run for every incoming message, synchronously, before
the service dispatch, in `_process_message`. Ours only stores the (bus, message) pair in a
ContextVar and returns False (not handled). The dispatch that follows in the same synchronous
call creates the Task for our coroutine method, and a Task copies the current context when it
is created, so the method reads back its own message. To fail closed should a future dbus-fast
dispatch differently, the method checks that the stored message is for the same member and
carries the very argument objects it was called with (dbus-fast passes the message body's
elements themselves); otherwise the call is refused with AccessDenied.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from dbus_fast import (
    BusType,
    DBusError,
    Message,
    MessageType,
    NameFlag,
    RequestNameReply,
    Variant,
)
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr, DBusUInt32, DBusUInt64
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from personalityd.adapters.bus import system_bus_address
from personalityd.core.desired import Edit, check_edit
from personalityd.core.errors import AccessDenied, InternalError, InvalidRequest, PersonalityError
from personalityd.core.history import CONFIRM_MODES, DEFAULT_TRIAL, MANUAL, TrialOptions
from personalityd.core.model import StackEvent
from personalityd.core.names import (
    BUS_NAME,
    ERROR_FAILED,
    ERROR_INVALID_ARGS,
    INTERFACE,
    OBJECT_PATH,
    OPTION_CONFIRM,
    OPTION_CONFIRM_MODE,
    OPTION_DATA,
    OPTION_FORCE,
    OPTION_FROM_UNIT,
    OPTION_SIGNATURES,
    OPTION_TIMEOUT,
    check_name,
)
from personalityd.frontends.dbus.credentials import (
    caller_from_bus,
    describe_owner,
    known_uid,
    refusals,
)
from personalityd.frontends.dbus.types import (
    ConflictList,
    GenerationList,
    Names,
    NoResult,
    Options,
    PersonalityList,
    StackChangedArgs,
)
from personalityd.stack.api import ManagerAPI

log = structlog.get_logger("personalityd.dbus")

_T = TypeVar("_T")


# The (bus, message) being dispatched; see the module docstring.
_current_call: contextvars.ContextVar[tuple[MessageBus, Message] | None] = contextvars.ContextVar(
    "personalityd_dbus_current_call", default=None
)


class ServeError(Exception):
    """The service could not be put on the bus; `str()` says why and what to check."""


@dataclass(frozen=True)
class CallOptions:
    timeout: float = 0.0
    force: bool = False
    from_unit: bool = False
    trial: TrialOptions = DEFAULT_TRIAL  # without `confirm`: the configured length
    data: bool = False


CHANGE_OPTIONS = (OPTION_CONFIRM, OPTION_CONFIRM_MODE)


def parse_options(
    options: Mapping[str, Variant], method: str, known: Collection[str]
) -> CallOptions:
    """Check an a{sv} options argument; raise InvalidRequest (InvalidArgs) naming the culprit."""
    timeout = 0.0
    force = from_unit = data = False
    confirm: int | None = None
    manual = False
    for key, variant in options.items():
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidRequest(f"unknown option {key!r} for {method} (known options: {allowed})")
        expected = OPTION_SIGNATURES[key]
        if variant.signature != expected:
            raise InvalidRequest(
                f"option {key!r} must be of D-Bus type {expected!r}, got {variant.signature!r}"
            )
        if key == OPTION_TIMEOUT:
            timeout = float(variant.value)
        elif key == OPTION_FORCE:
            force = bool(variant.value)
        elif key == OPTION_FROM_UNIT:
            from_unit = bool(variant.value)
        elif key == OPTION_CONFIRM:
            confirm = int(variant.value)
        elif key == OPTION_DATA:
            data = bool(variant.value)
        elif key == OPTION_CONFIRM_MODE:
            if variant.value not in CONFIRM_MODES:
                raise InvalidRequest(
                    f"option 'confirm_mode' must be 'auto' or 'manual', got {variant.value!r}"
                )
            manual = variant.value == MANUAL
    return CallOptions(
        timeout=timeout,
        force=force,
        from_unit=from_unit,
        trial=TrialOptions(confirm, manual),
        data=data,
    )


def check_names(names: Sequence[str]) -> list[str]:
    """Validate a Switch list: every name valid (InvalidName), none twice (InvalidArgs)."""
    check_edit(Edit("switch", tuple(names)))
    return list(names)


class ManagerInterface(ServiceInterface):
    """org.personalityd.personality1.Manager, backed by a ManagerAPI."""

    def __init__(self, manager: ManagerAPI) -> None:
        super().__init__(INTERFACE)
        self._manager = manager
        self._properties = self._property_values()
        self._buses: list[MessageBus] = []
        # An interface whose buses are all gone unsubscribes itself at the next event.
        self._unsubscribe = manager.subscribe(self._on_stack_event)

    def export_on(self, bus: MessageBus) -> None:
        """Export at OBJECT_PATH and install the handler that tells methods their caller."""
        in_signatures = {m.name: m.in_signature for m in self.introspect().methods}

        def remember_call(msg: Message) -> Message | bool:
            if msg.message_type is not MessageType.METHOD_CALL:
                _current_call.set(None)
                return False
            _current_call.set((bus, msg))
            # dbus-fast would answer UnknownMethod; bad arguments are InvalidArgs in our API.
            expected = in_signatures.get(msg.member or "")
            if (
                expected is not None
                and msg.path == OBJECT_PATH
                and msg.interface in (INTERFACE, None)
                and msg.signature != expected
            ):
                return Message.new_error(
                    msg,
                    ERROR_INVALID_ARGS,
                    f"{msg.member} takes arguments of type {expected!r}, got {msg.signature!r}",
                )
            return False  # not handled here: dbus-fast dispatches it next

        bus.add_message_handler(remember_call)
        bus.export(OBJECT_PATH, self)
        self._buses.append(bus)

    # -- methods ------------------------------------------------------------------------

    @dbus_method()
    def ListPersonalities(self) -> PersonalityList:
        return self._reading(
            "ListPersonalities",
            lambda: [
                (str(p.name), str(p.state), str(p.version), str(p.device), str(p.mount_point))
                for p in self._manager.list_personalities()
            ],
        )

    @dbus_method()
    async def Attach(self, name: DBusStr, options: Options) -> DBusBool:
        call = _this_call("Attach", (name, options))
        return await self._changing("Attach", call, self._attach(call, name, options))

    @dbus_method()
    async def Detach(self, name: DBusStr, options: Options) -> DBusBool:
        call = _this_call("Detach", (name, options))
        return await self._changing("Detach", call, self._detach(call, name, options))

    @dbus_method()
    async def Switch(self, names: Names, options: Options) -> DBusBool:
        call = _this_call("Switch", (names, options))
        return await self._changing("Switch", call, self._switch(call, names, options))

    @dbus_method()
    def ListConflicts(self) -> ConflictList:
        return self._reading(
            "ListConflicts",
            lambda: [
                (str(c.path), str(c.winner), [str(n) for n in c.shadowed], bool(c.identical))
                for c in self._manager.conflicts()
            ],
        )

    @dbus_method()
    async def Refresh(self) -> NoResult:
        call = _this_call("Refresh", ())
        await self._changing("Refresh", call, self._refresh(call))

    @dbus_method()
    async def Rollback(self, generation: DBusUInt64, options: Options) -> DBusUInt64:
        call = _this_call("Rollback", (generation, options))
        return await self._changing("Rollback", call, self._rollback(call, generation, options))

    @dbus_method()
    async def Confirm(self, generation: DBusUInt64) -> NoResult:
        call = _this_call("Confirm", (generation,))
        await self._changing("Confirm", call, self._confirm(call, generation))

    @dbus_method()
    def ListGenerations(self) -> GenerationList:
        return self._reading(
            "ListGenerations",
            lambda: [
                (int(g.number), [str(n) for n in g.names], int(g.realtime_usec), str(g.status),
                 str(g.cause))
                for g in self._manager.list_generations()
            ],
        )  # fmt: skip

    # -- properties ---------------------------------------------------------------------

    @dbus_property(access=PropertyAccess.READ)
    def Attached(self) -> Names:
        return [str(n) for n in self._manager.attached]

    @dbus_property(access=PropertyAccess.READ)
    def Desired(self) -> Names:
        return [str(n) for n in self._manager.desired]

    @dbus_property(access=PropertyAccess.READ)
    def Generation(self) -> DBusUInt64:
        return int(self._manager.generation)

    @dbus_property(access=PropertyAccess.READ)
    def ConflictCount(self) -> DBusUInt32:
        return len(self._manager.conflicts())

    @dbus_property(access=PropertyAccess.READ)
    def WritableDevice(self) -> DBusStr:
        return str(self._manager.writable_device)

    # Beyond the contract: the names ListPersonalities lists (so a watcher learns that an
    # image file appeared or went), and what an operator should know (a systemd-sysext merge).
    @dbus_property(access=PropertyAccess.READ)
    def Present(self) -> Names:
        return [str(n) for n in self._manager.present]

    @dbus_property(access=PropertyAccess.READ)
    def Notices(self) -> Names:
        return [str(n) for n in self._manager.notices]

    # -- signals ------------------------------------------------------------------------

    @dbus_signal()
    def StackChanged(self, generation: int, attached: list[str]) -> StackChangedArgs:
        return (generation, attached)

    @dbus_signal()
    def PersonalityAttached(self, name: str) -> DBusStr:
        return name

    @dbus_signal()
    def PersonalityDetached(self, name: str) -> DBusStr:
        return name

    # -- the work behind the methods ----------------------------------------------------

    async def _attach(self, call: tuple[MessageBus, Message], name: str, options: Options) -> bool:
        opts = parse_options(options, "Attach", (OPTION_TIMEOUT, OPTION_FORCE, *CHANGE_OPTIONS))
        check_name(name)
        caller = await caller_from_bus(*call)
        return await self._manager.attach(
            caller, name, timeout=opts.timeout, force=opts.force, trial=opts.trial
        )

    async def _detach(self, call: tuple[MessageBus, Message], name: str, options: Options) -> bool:
        opts = parse_options(options, "Detach", (OPTION_FROM_UNIT, *CHANGE_OPTIONS))
        check_name(name)
        caller = await caller_from_bus(*call)
        return await self._manager.detach(
            caller, name, from_unit=opts.from_unit, trial=opts.trial
        )

    async def _switch(
        self, call: tuple[MessageBus, Message], names: list[str], options: Options
    ) -> bool:
        opts = parse_options(options, "Switch", (OPTION_TIMEOUT, OPTION_FORCE, *CHANGE_OPTIONS))
        checked = check_names(names)
        caller = await caller_from_bus(*call)
        return await self._manager.switch(
            caller, checked, timeout=opts.timeout, force=opts.force, trial=opts.trial
        )

    async def _rollback(
        self, call: tuple[MessageBus, Message], generation: int, options: Options
    ) -> int:
        known = (OPTION_TIMEOUT, OPTION_FORCE, OPTION_DATA, *CHANGE_OPTIONS)
        opts = parse_options(options, "Rollback", known)
        caller = await caller_from_bus(*call)
        return await self._manager.rollback(
            caller, generation, timeout=opts.timeout, force=opts.force, trial=opts.trial,
            data=opts.data,
        )  # fmt: skip

    async def _confirm(self, call: tuple[MessageBus, Message], generation: int) -> None:
        caller = await caller_from_bus(*call)
        await self._manager.confirm(caller, generation)

    async def _refresh(self, call: tuple[MessageBus, Message]) -> None:
        caller = await caller_from_bus(*call)
        await self._manager.refresh(caller)

    async def _changing(
        self, method: str, call: tuple[MessageBus, Message], work: Awaitable[_T]
    ) -> _T:
        try:
            result = await work
        except PersonalityError as exc:
            if not isinstance(exc, AccessDenied):  # the manager logged that one already
                sender = call[1].sender
                refusals.info(known_uid(sender), "dbus_method_refused", method=method,
                              sender=sender, code=exc.code)  # fmt: skip
            raise DBusError(exc.dbus_name, str(exc)) from None
        except DBusError:
            raise
        except Exception:
            log.exception("dbus_method_failed", method=method, sender=call[1].sender)
            raise _internal_error() from None
        finally:
            # Desired can change without a stack change (a pending attach): no StackEvent.
            self._sync_properties()
        return result

    def _reading(self, method: str, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except PersonalityError as exc:
            raise DBusError(exc.dbus_name, str(exc)) from None
        except Exception:
            log.exception("dbus_method_failed", method=method)
            raise _internal_error() from None

    # -- events -------------------------------------------------------------------------

    def _on_stack_event(self, event: StackEvent) -> None:
        """Manager callback, on the event loop's thread: emit the signals for one change."""
        self._buses = [bus for bus in self._buses if bus.connected]
        if not self._buses:
            self._unsubscribe()
            return
        if not event.stack_changed:
            self._sync_properties()
            return
        try:
            self.StackChanged(event.generation, list(event.attached))
            for name in event.detached:
                self.PersonalityDetached(name)
            for name in event.newly_attached:
                self.PersonalityAttached(name)
            self._sync_properties()
        except Exception:
            log.exception("dbus_signal_failed", generation=event.generation)

    def _property_values(self) -> dict[str, Any]:
        m = self._manager
        return {
            "Attached": [str(n) for n in m.attached],
            "Desired": [str(n) for n in m.desired],
            "Generation": int(m.generation),
            "ConflictCount": len(m.conflicts()),
            "WritableDevice": str(m.writable_device),
            "Present": [str(n) for n in m.present],
            "Notices": [str(n) for n in m.notices],
        }

    def _sync_properties(self) -> None:
        """Emit PropertiesChanged for the properties that differ from the last emitted values."""
        try:
            current = self._property_values()
        except Exception:
            log.exception("dbus_properties_read_failed")
            return
        changed = {k: v for k, v in current.items() if self._properties.get(k) != v}
        self._properties = current
        if changed:
            self.emit_properties_changed(changed)


def _this_call(member: str, args: tuple[object, ...]) -> tuple[MessageBus, Message]:
    """The bus and message of the method call being served; refuse if it cannot be told."""
    call = _current_call.get()
    if call is not None:
        msg = call[1]
        body = msg.body
        if (
            msg.member == member
            and msg.sender
            and len(body) == len(args)
            and all(a is b for a, b in zip(body, args, strict=True))
        ):
            return call
    log.error("dbus_caller_unknown", method=member)
    raise DBusError(AccessDenied.dbus_name, "cannot identify the caller of this request")


def _internal_error() -> DBusError:
    return DBusError(ERROR_FAILED, InternalError().message)


async def serve(
    manager: ManagerAPI,
    bus_address: str | None = None,
) -> MessageBus:
    """Connect to the system bus, export the Manager interface and own BUS_NAME.

    `bus_address` defaults to $DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus socket.
    Raises ServeError when the bus cannot be reached or the name cannot be owned (taken, or
    refused by the bus policy). The caller disconnects the returned bus to stop serving.
    """
    address = system_bus_address(bus_address)
    try:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        raise ServeError(f"cannot connect to the system bus at {address}: {exc}") from exc
    try:
        ManagerInterface(manager).export_on(bus)
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            raise ServeError(
                f"cannot own the bus name {BUS_NAME}: {exc.text} (is the policy file "
                f"{BUS_NAME}.conf installed in /usr/share/dbus-1/system.d, and are we root?)"
            ) from exc
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            owner = await describe_owner(bus, BUS_NAME)
            raise ServeError(
                f"cannot own the bus name {BUS_NAME}: it is owned by {owner}; "
                "is another personalityd running?"
            )
    except BaseException:
        bus.disconnect()
        raise
    log.info("dbus_serving", bus_name=BUS_NAME, address=address, unique_name=bus.unique_name)
    return bus
