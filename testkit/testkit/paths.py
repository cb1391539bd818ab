"""Where the personalityd repository is: testkit is installed editable from `REPO/testkit`."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

if not (REPO / "daemon" / "personalityd").is_dir():
    raise ImportError(
        f"testkit is not inside a personalityd checkout ({REPO}): "
        "install it editable from the repository (`pip install -e ./testkit`, `make deps`)"
    )
