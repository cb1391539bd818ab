"""The D-Bus signatures as typed aliases for dbus-fast (it reads the DBusSignature in Annotated)."""

from __future__ import annotations

from typing import Annotated

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature

from personalityd.core.names import (
    SIG_CONFLICT_LIST,
    SIG_GENERATION_LIST,
    SIG_NAMES,
    SIG_OPTIONS,
    SIG_PERSONALITY_LIST,
    SIG_STACK_CHANGED,
)

PersonalityRow = tuple[str, str, str, str, str]
ConflictRow = tuple[str, str, list[str], bool]
PersonalityList = Annotated[list[PersonalityRow], DBusSignature(SIG_PERSONALITY_LIST)]
ConflictList = Annotated[list[ConflictRow], DBusSignature(SIG_CONFLICT_LIST)]
GenerationRow = tuple[int, list[str], int, str, str]
GenerationList = Annotated[list[GenerationRow], DBusSignature(SIG_GENERATION_LIST)]
Options = Annotated[dict[str, Variant], DBusSignature(SIG_OPTIONS)]
Names = Annotated[list[str], DBusSignature(SIG_NAMES)]
StackChangedArgs = Annotated[tuple[int, list[str]], DBusSignature(SIG_STACK_CHANGED)]
# A method without out arguments. Not `-> None`: with postponed annotations dbus-fast reads the
# string "None" as the Python value None instead of an empty signature.
NoResult = Annotated[None, DBusSignature("")]
