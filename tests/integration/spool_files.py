"""Request files for the spool adapter tests (test_spool_*.py): a body, and dropping a file in
the documented way. The `spool_dir` fixture they use is in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

BODY = b'{"action": "attach", "personality": "web"}'


def drop(spool_dir: Path, name: str, body: bytes = BODY) -> Path:
    """Submit a request the documented way: write a dotfile, rename it in."""
    temporary = spool_dir / f".{name}.tmp"
    temporary.write_bytes(body)
    target = spool_dir / name
    os.rename(temporary, target)
    return target
