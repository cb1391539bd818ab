"""find_conflicts called with recording callbacks, for test_conflicts*.py: short names for the
entry kinds, layers as tables, and what the callbacks were asked."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from oracles import find_conflicts

from personalityd.core.model import (
    DIR,
    FILE,
    MASK_DELETED,
    MASK_HIDDEN,
    OPAQUE_DIR,
    SYMLINK,
    WHITEOUT,
    Conflict,
    Mask,
)

d, o, f, ln, w = DIR, OPAQUE_DIR, FILE, SYMLINK, WHITEOUT

Layers = list[tuple[str, dict[str, str]]]


class Recorder:
    """The two callbacks, recording how they were called."""

    def __init__(self, base: dict[str, str], same: bool | Callable[[str], bool] = False) -> None:
        self.base = base
        self.same = same
        self.base_calls: list[str] = []
        self.identical_calls: list[tuple[str, tuple[str, ...]]] = []

    def base_kind(self, path: str) -> str | None:
        self.base_calls.append(path)
        return self.base.get(path)

    def identical(self, path: str, names: Sequence[str]) -> bool:
        self.identical_calls.append((path, tuple(names)))
        return self.same(path) if callable(self.same) else self.same


def run(
    layers: Layers, base: dict[str, str] | None = None, same: bool = False
) -> tuple[list[Conflict], int, Recorder]:
    conflicts, overrides, _, recorder = run_all(layers, base, same)
    return conflicts, overrides, recorder


def run_all(
    layers: Layers, base: dict[str, str] | None = None, same: bool = False
) -> tuple[list[Conflict], int, list[Mask], Recorder]:
    recorder = Recorder(base or {}, same)
    conflicts, overrides, masks = find_conflicts(
        "/usr", layers, recorder.base_kind, recorder.identical
    )
    return conflicts, overrides, masks, recorder


def c(path: str, winner: str, *shadowed: str, identical: bool = False) -> Conflict:
    return Conflict(
        path="/usr/" + path,
        hierarchy="/usr",
        winner=winner,
        shadowed=shadowed,
        identical=identical,
    )


def deleted(path: str, name: str) -> Mask:
    return Mask("/usr/" + path, "/usr", name, MASK_DELETED)


def hidden(path: str, name: str) -> Mask:
    return Mask("/usr/" + path, "/usr", name, MASK_HIDDEN)
