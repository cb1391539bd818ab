"""What every personalityctl verb prints with: aligned tables, counts, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

PROG: Final = "personalityctl"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned as systemctl does: upper-case header, empty cells as '-'."""
    cells = [[h.upper() for h in headers]] + [[c if c else "-" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(" ".join(padded).rstrip())
    return "\n".join(lines)


def count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))
