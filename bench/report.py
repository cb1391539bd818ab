"""The one report writer: bench/results.json (every run's figure) and bench/results.md."""

from __future__ import annotations

import json
from collections.abc import Sequence

from record import Meta, Row, Summary
from settings import ANALYSIS_MD, RESULTS_JSON, RESULTS_MD


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "paths/s":
        return f"{value:,.0f}/s"
    if unit in ("MiB", "bytes/path", "ms") or unit.startswith("ms beyond "):
        return f"{value:.1f} {unit.split()[0]}"
    return f"{value:g}"


def cell(stats: Summary | None, unit: str) -> str:
    """`median (min to max)` in the row's unit."""
    if stats is None or stats.median is None:
        return "-"
    return f"{fmt(stats.median, unit)} ({fmt(stats.min, unit)} to {fmt(stats.max, unit)})"


def ratio_cell(stats: Summary | None) -> str:
    if stats is None or stats.median is None or stats.min is None or stats.max is None:
        return "-"
    return f"{stats.median:.2f}x ({stats.min:.2f} to {stats.max:.2f})"


def load() -> tuple[list[Row], Meta]:
    """The rows and metadata in bench/results.json."""
    saved = json.loads(RESULTS_JSON.read_text())
    return [Row.from_json(r) for r in saved["rows"]], Meta.from_json(saved["meta"])


# Rows measured by scripts of their own rather than bench/run.py (they boot a container):
# every run keeps them from results.json.
STANDALONE_ROWS = frozenset({"trial_rollback"})


def merged(rows: Sequence[Row], partial: bool) -> list[Row]:
    """With only some rows asked for, the others are kept from the last results.json."""
    if not RESULTS_JSON.exists():
        return list(rows)
    new = {r.key: r for r in rows}
    old, _ = load()
    if not partial:
        return list(rows) + [r for r in old if r.key in STANDALONE_ROWS and r.key not in new]
    keep = [new.pop(r.key, r) for r in old]
    return keep + list(new.values())


def _table_line(r: Row) -> str:
    ref = r.reference
    ref_unit = "ms" if r.unit.startswith("ms beyond ") else r.unit
    ref_text = "-" if ref is None else f"{cell(ref.figures, ref_unit)}: {ref.what}"
    met = {True: "yes", False: "**no**", None: "-"}[r.met]
    return (
        f"| {r.figure} | {cell(r.personalityd, r.unit)} | {ref_text} | "
        f"{ratio_cell(r.ratio)} | {r.goal} | {met} |"
    )


def markdown(rows: Sequence[Row], meta: Meta) -> str:
    """results.md: the table, the notes per row, then bench/analysis.md as it is."""
    lines = [
        "# personalityd benchmark results",
        "",
        f"Measured {meta.date} on {meta.machine} (kernel {meta.kernel}, "
        f"{meta.cpus} CPUs), {'QUICK mode' if meta.quick else 'full run'}; "
        f"`make bench` wrote this file (and `results.json`) in {meta.seconds:.0f} s.",
        "Each cell: median (min to max) over the runs; ratios are taken per pair of runs "
        "(personalityd / reference) measured one after the other in the same run.",
        "",
        "| figure | personalityd | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_table_line(r) for r in rows]
    lines += ["", "## Notes per row", ""]
    lines += [f"- **{r.key}**: {r.notes}" for r in rows if r.notes]
    if ANALYSIS_MD.exists():
        lines += ["", ANALYSIS_MD.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[Row], meta: Meta) -> None:
    document = {"meta": meta.to_json(), "rows": [r.to_json() for r in rows]}
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n")
    RESULTS_MD.write_text(markdown(rows, meta))
