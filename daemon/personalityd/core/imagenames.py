"""Which entries of one search-path directory are personalities, and under which name.

An entry is an image file `NAME.raw`, `NAME.sysext.raw`, `NAME.squashfs`, `NAME.erofs` or
`NAME.img`, a symlink with such a name (the systemd-sysupdate layout `NAME.raw ->
NAME_1.2.raw`), or a directory `NAME` holding the tree (docs/images.md). Everything
else in a search directory is not an entry: dotfiles (so `.#web.raw` and other names an
editor or a download tool writes first), temporary names (`web.raw.tmp`, `web.raw~`), names
that break the personality name rule (core/names.py).

Within one directory, two rules settle what is left:

- A file (or anything) that a symlink entry of the same directory points to, by a bare name
  or `./name`, is that symlink's content, not an entry of its own: `web.raw -> web_1.2.raw`
  is the one personality `web`, never also a personality `web_1.2`. This holds whatever the
  target's name is. Entries that point at each other in a circle are all kept, so that each
  is refused (a symlink loop) rather than silently dropped.
- Two entries that give the same name are ordered by `PREFERENCE`, systemd's own order
  (src/shared/discover-image.c, `image_find()` tries `NAME` as a directory first, then
  `NAME.sysext.raw`, then `NAME.raw`), with the suffixes only personalityd knows after them:
  `.squashfs`, `.erofs`, `.img`. The first is the candidate's `entry`; the others are its
  `shadowed`, in the same order, to be reported.

Nothing here touches the filesystem: the caller lists the directory (without following
symlinks) and checks each candidate's ownership afterwards (adapters/imagedirs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from personalityd.core.names import is_valid_name

ListedKind = Literal["file", "dir", "symlink", "other"]

# Longest first: `web.sysext.raw` is `web`, not `web.sysext`.
FILE_SUFFIXES: Final = (".sysext.raw", ".raw", ".squashfs", ".erofs", ".img")

# The suffix that stands for a directory entry: none.
DIRECTORY: Final = ""

# Which entry wins when one directory holds several of the same name: lower is preferred.
PREFERENCE: Final = {suffix: rank for rank, suffix in enumerate((DIRECTORY, *FILE_SUFFIXES))}


@dataclass(frozen=True)
class Listed:
    """One directory entry as listed without following it: a symlink is `symlink` whatever it
    points to, and carries its target as read (`readlink`)."""

    filename: str
    kind: ListedKind
    link_target: str | None = None


@dataclass(frozen=True)
class Candidate:
    """The entries of one directory that stand for personality `name`: `entry` is preferred,
    `shadowed` are the others of the same name, in order of preference (usually none)."""

    name: str
    entry: Listed
    shadowed: tuple[Listed, ...] = ()

    @property
    def options(self) -> tuple[Listed, ...]:
        """Every entry of this name, preferred first."""
        return (self.entry, *self.shadowed)


def entry_suffix(filename: str, is_dir: bool) -> str | None:
    """The suffix that makes `filename` an entry (`DIRECTORY` for a directory), or None.

    Suffixes are matched as they are spelled (`web.RAW` is not an entry), and a directory
    carrying a file suffix (`web.raw/`) is not an entry: it is a mistake, not a personality
    called `web.raw`.
    """
    if filename.startswith("."):
        return None
    suffix = next((s for s in FILE_SUFFIXES if filename.endswith(s)), None)
    if is_dir:
        return DIRECTORY if suffix is None else None
    return suffix


def entry_name(filename: str, is_dir: bool) -> str | None:
    """The personality name the entry `filename` stands for, or None when it is no entry.

    `web.raw`, `web.sysext.raw`, `web.squashfs`, `web.erofs`, `web.img` -> `web`; a directory
    `web` -> `web`; dotfiles, temporary names and names that fail the name rule -> None.
    """
    suffix = entry_suffix(filename, is_dir)
    if suffix is None:
        return None
    name = filename[: len(filename) - len(suffix)]
    return name if is_valid_name(name) else None


def listed_name(listed: Listed) -> str | None:
    """`entry_name` of a listed entry: only a directory may go without a suffix (a symlink
    must be named like the image file it points to)."""
    return entry_name(listed.filename, listed.kind == "dir")


def same_directory_target(link_target: str) -> str | None:
    """The file name a symlink target names in the symlink's own directory (`web_1.2.raw`,
    `./web_1.2.raw`), or None when it leads anywhere else (absolute, `..`, a subdirectory)."""
    target = link_target
    while target.startswith("./"):
        target = target[2:].lstrip("/")
    if not target or "/" in target or target in (".", ".."):
        return None
    return target


def _links(listing: Sequence[Listed]) -> dict[str, str]:
    """Symlink entry -> the entry of the same directory it points to."""
    present = {item.filename for item in listing}
    links: dict[str, str] = {}
    for item in listing:
        if item.kind != "symlink" or item.link_target is None or listed_name(item) is None:
            continue
        target = same_directory_target(item.link_target)
        if target is not None and target in present:
            links[item.filename] = target
    return links


def _on_cycle(start: str, links: dict[str, str]) -> bool:
    seen: set[str] = set()
    current = links.get(start)
    while current is not None and current not in seen:
        if current == start:
            return True
        seen.add(current)
        current = links.get(current)
    return False


def absorbed_targets(listing: Sequence[Listed]) -> set[str]:
    """File names that are the content of a symlink entry of the same directory, so not
    entries of their own. Entries on a circle of symlinks are never absorbed.

    So are the other versions beside such a link, in systemd-sysupdate's layout (a version
    starts with a digit): with `web.raw -> web_1.2.raw`, the `web_1.1.raw` kept from before
    is `web`'s earlier version,
    not a personality `web_1.1` (which its manifest, naming `web`, would contradict)."""
    links = _links(listing)
    absorbed = {
        target
        for source, target in links.items()
        if target != source and not _on_cycle(target, links)
    }
    versioned = [v for v in (_version_prefix(s) for s in links if s not in absorbed) if v]
    for item in listing:
        if item.kind == "file" and item.filename not in links:
            name = listed_name(item)
            suffix = entry_suffix(item.filename, False)
            if name is not None and any(
                suffix == known and name.startswith(prefix) and name[len(prefix) :][:1].isdigit()
                for prefix, known in versioned
            ):
                absorbed.add(item.filename)
    return absorbed


def _version_prefix(link: str) -> tuple[str, str] | None:
    """(`web_`, `.raw`) for the symlink entry `web.raw`: the versions it may point to."""
    suffix = entry_suffix(link, False)
    name = entry_name(link, False)
    if suffix is None or name is None:
        return None
    return (name + "_", suffix)


def _preference(item: Listed) -> tuple[int, str]:
    suffix = entry_suffix(item.filename, item.kind == "dir")
    rank = PREFERENCE[suffix] if suffix is not None else len(PREFERENCE)
    return rank, item.filename


def select_entries(listing: Iterable[Listed]) -> list[Candidate]:
    """The personalities one directory offers, sorted by name, one Candidate per name.

    `listing` is the whole directory (order does not matter). Entries absorbed by a symlink
    entry pointing at them are left out; entries sharing a name are ordered by `PREFERENCE`.
    """
    items = list(listing)
    absorbed = absorbed_targets(items)
    by_name: dict[str, list[Listed]] = {}
    for item in items:
        name = listed_name(item)
        if name is None or item.filename in absorbed:
            continue
        by_name.setdefault(name, []).append(item)
    candidates = []
    for name in sorted(by_name):
        options = sorted(by_name[name], key=_preference)
        candidates.append(Candidate(name, options[0], tuple(options[1:])))
    return candidates
