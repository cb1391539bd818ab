"""The typed records of a benchmark run: figures, rows, the run's metadata, a benchmark.

Their JSON form (`to_json`/`from_json`) is the format of `bench/results.json`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from dataset import Recipe
    from harness import Env

Json: TypeAlias = "dict[str, Json] | list[Json] | str | int | float | bool | None"


@dataclass(frozen=True)
class Summary:
    """Median, min and max of the runs of one figure, and the values themselves."""

    median: float | None
    min: float | None
    max: float | None
    runs: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(None, None, None, 0, ())
        return cls(statistics.median(values), min(values), max(values), len(values), tuple(values))

    def to_json(self) -> dict[str, Json]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "runs": self.runs,
            "values": list(self.values),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Summary:
        return cls(data["median"], data["min"], data["max"], data["runs"], tuple(data["values"]))


@dataclass(frozen=True)
class Reference:
    """What personalityd is measured against, and its figures from the same run."""

    what: str
    figures: Summary

    def to_json(self) -> dict[str, Json]:
        return {"what": self.what, **self.figures.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        return cls(data["what"], Summary.from_json(data))


@dataclass(frozen=True)
class Row:
    """One row of bench/results.md: a figure of personalityd beside its reference."""

    key: str
    figure: str
    unit: str
    personalityd: Summary
    reference: Reference | None
    ratio: Summary | None
    goal: str
    met: bool | None
    notes: str = ""
    extra: Mapping[str, Json] | None = None  # per-run details, kept in results.json only

    def to_json(self) -> dict[str, Json]:
        data: dict[str, Json] = {
            "key": self.key,
            "figure": self.figure,
            "unit": self.unit,
            "personalityd": self.personalityd.to_json(),
            "reference": None if self.reference is None else self.reference.to_json(),
            "ratio": None if self.ratio is None else self.ratio.to_json(),
            "goal": self.goal,
            "met": self.met,
            "notes": self.notes,
        }
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Row:
        reference, ratio = data["reference"], data["ratio"]
        return cls(
            key=data["key"],
            figure=data["figure"],
            unit=data["unit"],
            personalityd=Summary.from_json(data["personalityd"]),
            reference=None if reference is None else Reference.from_json(reference),
            ratio=None if ratio is None else Summary.from_json(ratio),
            goal=data["goal"],
            met=data["met"],
            notes=data.get("notes", ""),
            extra=data.get("extra"),
        )


def measured(
    key: str,
    figure: str,
    unit: str,
    ours: Sequence[float],
    *,
    goal: str,
    met: bool | None,
    reference: tuple[str, Sequence[float]] | None = None,
    ratios: Sequence[float] | None = None,
    notes: str = "",
    extra: Mapping[str, Json] | None = None,
) -> Row:
    """A row from the raw values of each run; `reference` is (what, values).

    Without `ratios`, a reference's ratios are taken per pair of runs (ours / reference).
    """
    if ratios is None and reference is not None:
        ratios = [a / b for a, b in zip(ours, reference[1], strict=False) if b]
    return Row(
        key=key,
        figure=figure,
        unit=unit,
        personalityd=Summary.of(ours),
        reference=None if reference is None else Reference(reference[0], Summary.of(reference[1])),
        ratio=None if ratios is None else Summary.of(ratios),
        goal=goal,
        met=met,
        notes=notes,
        extra=extra,
    )


def not_measured(key: str, error: BaseException) -> Row:
    """The row of a benchmark that failed: no figures, not met, the error in the notes."""
    return measured(key, key, "-", [], goal="", met=False, notes=f"not measured: {error!r}")


@dataclass(frozen=True)
class Meta:
    """When, where and how the results were measured."""

    date: str
    machine: str
    kernel: str
    cpus: int | None
    quick: bool
    seconds: float
    python: str

    def to_json(self) -> dict[str, Json]:
        return {
            "date": self.date,
            "machine": self.machine,
            "kernel": self.kernel,
            "cpus": self.cpus,
            "quick": self.quick,
            "seconds": self.seconds,
            "python": self.python,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Meta:
        return cls(
            data["date"],
            data["machine"],
            data["kernel"],
            data["cpus"],
            data["quick"],
            data["seconds"],
            data["python"],
        )


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: the images it needs and the measurement, which gives one or more rows."""

    name: str
    recipes: Callable[[], list[Recipe]]
    measure: Callable[[Env], list[Row]]
