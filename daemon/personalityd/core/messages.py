"""Journal MESSAGE_IDs of our entries (docs/journal.md) and the identifier every entry carries."""

from __future__ import annotations

from personalityd.core.model import MASK_DELETED, Conflict, Mask
from personalityd.core.orphans import Orphan

SYSLOG_IDENTIFIER = "personalityd"

MESSAGE_ID_CONFLICT = "3e47b2d0af514d77b3126415a1549afb"
MESSAGE_ID_STACK_CHANGED = "745778a2970b4475acba70df8299437b"
MESSAGE_ID_VOLUME_REFUSED = "18d0afe90a164b398024e69871a6bc44"
MESSAGE_ID_CHANGE_FAILED = "091e1791abd44213b5aa028ad69c8fce"
MESSAGE_ID_MASK = "727c1463be574032988019655f1f0294"
MESSAGE_ID_ORPHAN = "ff355680e36e48609dc2bf9664415a79"

# A declaration of a personality (sysusers.d, tmpfiles.d, the linker's cache) that its tool
# failed to apply after a swap (docs/journal.md).
MESSAGE_ID_DECLARATION_FAILED = "eb76d494c8d94ecdbe827d8221d1e6dc"

# Trials (docs/trials.md): a generation on trial, confirmed, or rolled back.
MESSAGE_ID_TRIAL_STARTED = "ff8126e592204485bd2ed37326e8cab3"
MESSAGE_ID_TRIAL_CONFIRMED = "cf7ea7a0ed7d4c18bfb93a266a8add35"
MESSAGE_ID_ROLLED_BACK = "5beb5094764f4b60a639610dd1185344"

# At most this many conflict entries per stack change, and as many mask entries; the summary
# says how many of each were left out.
MAX_CONFLICT_ENTRIES = 1000


def conflict_message(c: Conflict) -> str:
    """The journal MESSAGE for one conflict."""
    shadowed = ", ".join(f"'{name}'" for name in c.shadowed)
    message = f"Conflict on {c.path}: '{c.winner}' (attached last) shadows {shadowed}"
    return message + " (identical content)" if c.identical else message


def mask_message(m: Mask) -> str:
    """The journal MESSAGE for one mask."""
    if m.mask == MASK_DELETED:
        return f"Mask on {m.path}: '{m.name}' deletes the base's entry (whiteout)"
    return f"Mask on {m.path}: '{m.name}' hides the base's directory (opaque directory)"


def orphan_message(o: Orphan, on_volume: str) -> str:
    """The journal MESSAGE for one orphan moved aside."""
    return (
        f"Orphan {o.path}: written under '{o.name}', which left the stack; "
        f"moved aside to {on_volume} on the writable volume"
    )
