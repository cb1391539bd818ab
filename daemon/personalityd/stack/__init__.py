"""The stack: the manager's queue, the change transaction, the mount engine, the volume registry."""
