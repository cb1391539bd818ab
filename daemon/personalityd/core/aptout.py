"""What apt-get and dpkg say, read into data: the simulation, the errors, the status database.

`apt-get install -s` prints one action per line (`Inst`, `Conf`, `Remv`), the version already
installed in brackets when there is one:

    Inst libfoo1 (1.2-3 Debian:12.5/stable [amd64])           a new package
    Inst libc6 [2.36-9] (2.36-9+deb12u4 Debian:... [amd64])   a package of the base upgraded
    Remv exim4 [4.96-15]                                      a package of the base removed

Pure: text in, data out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_INST = re.compile(r"^Inst (\S+) (?:\[([^\]]+)\] )?\((\S+)")
_REMV = re.compile(r"^Remv (\S+)(?: \[([^\]]+)\])?")
_UNKNOWN = (
    re.compile(r"^E: Unable to locate package (\S+)"),
    re.compile(r"^E: Package '([^']+)' has no installation candidate"),
    re.compile(r"^E: Couldn't find any package by (?:glob|regex) '([^']+)'"),
    re.compile(r"^E: Version '[^']+' for '([^']+)' was not found"),
)
_UNMET = re.compile(r"^\s*(\S+)\s*:\s*((?:Pre)?Depends|Conflicts|Breaks): (.+)$")
_DPKG_FAILED = re.compile(r"^dpkg: error processing (?:package|archive) (\S+) \((--\w+)\):")
_SCRIPT = re.compile(r"(pre-installation|post-installation|pre-removal|post-removal) script")
_STATUS = re.compile(r"exit status (\d+)")


@dataclass(frozen=True)
class Action:
    """One package apt would install or remove."""

    package: str  # name, with ':arch' when apt printed one
    version: str  # the version apt installs ('' for a removal)
    installed: str  # the version the base has ('' when it has none)

    @property
    def is_new(self) -> bool:
        return not self.installed and bool(self.version)

    @property
    def is_removal(self) -> bool:
        return not self.version


def parse_simulation(text: str) -> list[Action]:
    """The Inst and Remv lines of `apt-get install -s` output, in order."""
    actions = []
    for line in text.splitlines():
        if m := _INST.match(line):
            actions.append(Action(m.group(1), m.group(3), m.group(2) or ""))
        elif m := _REMV.match(line):
            actions.append(Action(m.group(1), "", m.group(2) or "?"))
    return actions


def base_changes(actions: Iterable[Action]) -> list[Action]:
    """The actions that change a package of the base (an upgrade, downgrade or removal)."""
    return [a for a in actions if a.installed]


def unknown_packages(text: str) -> list[str]:
    """Package names apt does not know, from its error lines."""
    found = []
    for line in text.splitlines():
        for pattern in _UNKNOWN:
            if m := pattern.match(line.strip()):
                found.append(m.group(1))
    return found


def unmet_dependencies(text: str) -> list[str]:
    """The lines of "The following packages have unmet dependencies", one per dependency."""
    lines = text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if "have unmet dependencies" in ln)
    except StopIteration:
        return []
    found = []
    current = ""
    for line in lines[start + 1 :]:
        if m := _UNMET.match(line):
            current = m.group(1)
            found.append(f"{current} {m.group(2)}: {m.group(3).strip()}")
        elif current and line.startswith(" ") and ":" in line and not line.startswith("E:"):
            kind, _, rest = line.strip().partition(": ")
            if kind.endswith(("Depends", "Conflicts", "Breaks")):
                found.append(f"{current} {kind}: {rest.strip()}")
        else:
            break
    return found


@dataclass(frozen=True)
class DpkgFailure:
    package: str
    phase: str  # --configure, --unpack, ...
    script: str  # "post-installation script", or '' when dpkg failed otherwise
    status: str  # exit status of the script, or ''
    detail: str  # the line dpkg printed after the package

    def message(self) -> str:
        if self.script:
            exit_ = f" (exit status {self.status})" if self.status else ""
            return f"package {self.package}: its {self.script} failed{exit_}"
        return f"package {self.package}: dpkg {self.phase} failed: {self.detail}"


def dpkg_failures(text: str) -> list[DpkgFailure]:
    """Each package dpkg could not unpack or configure, from the install output."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _DPKG_FAILED.match(line)
        if not m:
            continue
        package = m.group(1)
        if package.endswith(".deb"):
            package = package.rsplit("/", 1)[-1].split("_", 1)[0]
        detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
        script = _SCRIPT.search(detail)
        status = _STATUS.search(detail)
        found.append(
            DpkgFailure(
                package,
                m.group(2),
                f"{script.group(1)} script" if script else "",
                status.group(1) if status else "",
                detail,
            )
        )
    return found


def last_error(text: str) -> str:
    """The last 'E:' line apt printed (without the prefix), else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln[2:].strip() for ln in lines if ln.startswith("E:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Installed:
    package: str
    version: str
    architecture: str


def parse_dpkg_status(text: str) -> dict[str, Installed]:
    """name -> Installed for every package whose status is 'install ok installed'."""
    found: dict[str, Installed] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        name = fields.get("Package")
        if name and fields.get("Status") == "install ok installed":
            found[name] = Installed(name, fields.get("Version", ""), fields.get("Architecture", ""))
    return found


def installed_by_build(base: str, after: str) -> list[Installed]:
    """Packages installed or changed by the build: in `after`'s status and not so in `base`'s."""
    before = parse_dpkg_status(base)
    return sorted(
        (p for name, p in parse_dpkg_status(after).items() if before.get(name) != p),
        key=lambda p: p.package,
    )
