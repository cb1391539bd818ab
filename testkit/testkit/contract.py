"""Names from the design contract, spelled out here rather than imported from the daemon.

The tests check the daemon against these: a rename in the daemon that breaks the contract
fails a test instead of silently changing both sides.
"""

from __future__ import annotations

# D-Bus (docs/dbus.md).
BUS = "org.personalityd.personality1"
PATH = "/org/personalityd/personality1"
IFACE = "org.personalityd.personality1.Manager"

# Journal MESSAGE_IDs (docs/journal.md).
MESSAGE_ID_CONFLICT = "3e47b2d0af514d77b3126415a1549afb"
MESSAGE_ID_STACK_CHANGED = "745778a2970b4475acba70df8299437b"
MESSAGE_ID_VOLUME_REFUSED = "18d0afe90a164b398024e69871a6bc44"
MESSAGE_ID_ROLLED_BACK = "091e1791abd44213b5aa028ad69c8fce"
MESSAGE_ID_MASK = "727c1463be574032988019655f1f0294"
MESSAGE_ID_ORPHAN = "ff355680e36e48609dc2bf9664415a79"

# The daemon's default paths (docs/configuration.md), relative to its root.
DEFAULT_PATHS = {
    "mount_root": "/opt/personality",
    "spool": "/var/spool/personalityd",
    "state": "/var/lib/personalityd",
    "runtime": "/run/personalityd",
}

# Spool result directories (docs/spool.md).
RESULT_DIRS = ("done", "failed")

# The log event the daemon writes (on stderr) once coldplug and reconcile are done.
READY_EVENT = "daemon_ready"
