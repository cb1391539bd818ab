"""`/var` content of an install as tmpfiles.d lines, with the files under `usr/share/factory/`.

A personality is read-only and `/var` belongs to the system, so what maintainer scripts left
under `/var` is shipped as declarations that systemd-tmpfiles applies at attach:

- a new directory that holds only directories: a `d` line for each (mode, user, group);
- a new directory that holds files or symlinks: one `C` line copying its tree from
  `/usr/share/factory/var/...` (the whole tree is given the directory's owner), and a `z` line
  for each entry below it whose owner or group differs;
- a new file: a `C` line (mode, user, group); a new symlink: an `L` line;
- a directory of the base whose mode or owner the scripts changed: a `d` line.

Owners are named (`mysql`, not 104), so the lines hold whatever numbers sysusers picks.
Files of the base that the scripts changed under `/var` cannot be declared (tmpfiles.d never
replaces a file); the caller lists them as dropped.

Pure: entries in, lines out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from personalityd.core.upperplan import DIR, FILE, SYMLINK, Entry

FACTORY: Final = "usr/share/factory"


@dataclass
class VarPlan:
    lines: list[str] = field(default_factory=list)
    factory: list[Entry] = field(default_factory=list)  # entries copied to FACTORY/<path>
    base_files: list[str] = field(default_factory=list)  # base files changed: not carried


def quote_field(value: str) -> str:
    """A tmpfiles.d field, quoted when it holds blanks or quotes."""
    if value and not any(c.isspace() or c in "\"'\\" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render(kind: str, path: str, mode: str, user: str, group: str, argument: str = "") -> str:
    fields = [kind, quote_field(path), mode, quote_field(user), quote_field(group), "-"]
    if argument:
        fields.append(quote_field(argument))
    return " ".join(fields)


def _mode(entry: Entry) -> str:
    """Directories keep their set-group-ID bit (a shared log directory); files never get one."""
    bits = entry.mode & (0o7777 if entry.kind == DIR else 0o1777)
    return f"{bits:04o}"


def _has_content(path: str, entries: Sequence[Entry]) -> bool:
    prefix = path + "/"
    return any(e.path.startswith(prefix) and e.kind != DIR for e in entries)


def var_plan(
    entries: Sequence[Entry], users: Mapping[int, str], groups: Mapping[int, str]
) -> VarPlan:
    """The tmpfiles.d lines and factory files for the kept `/var` entries of an upper."""
    result = VarPlan()
    ordered = sorted(entries, key=lambda e: e.path.split("/"))

    def owner(entry: Entry) -> tuple[str, str]:
        return users.get(entry.uid, str(entry.uid)), groups.get(entry.gid, str(entry.gid))

    copied: list[Entry] = []  # roots of trees a C line copies
    for entry in ordered:
        path = "/" + entry.path
        root = next((r for r in copied if entry.path.startswith(r.path + "/")), None)
        if root is not None:
            result.factory.append(entry)
            if entry.kind != SYMLINK and (entry.uid, entry.gid) != (root.uid, root.gid):
                result.lines.append(render("z", path, _mode(entry), *owner(entry)))
            continue
        if entry.kind == DIR:
            if entry.in_base == DIR:
                if entry.base_meta != (entry.mode, entry.uid, entry.gid):
                    result.lines.append(render("d", path, _mode(entry), *owner(entry)))
            elif _has_content(entry.path, ordered):
                copied.append(entry)
                result.factory.append(entry)
                source = f"/{FACTORY}/{entry.path}"
                result.lines.append(render("C", path, _mode(entry), *owner(entry), source))
            else:
                result.lines.append(render("d", path, _mode(entry), *owner(entry)))
        elif entry.in_base is not None:
            result.base_files.append(entry.path)
        elif entry.kind == SYMLINK:
            result.lines.append(render("L", path, "-", "-", "-", entry.target))
        elif entry.kind == FILE:
            result.factory.append(entry)
            source = f"/{FACTORY}/{entry.path}"
            result.lines.append(render("C", path, _mode(entry), *owner(entry), source))
    return result
