"""What a `build --packages` made: the report printed as text or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BuildReport:
    name: str
    image: str
    format: str
    image_version: str = ""
    base: str = "/"
    requested: list[str] = field(default_factory=list)
    packages: list[dict[str, str]] = field(default_factory=list)  # name, version, architecture
    base_upgrades: list[dict[str, str]] = field(default_factory=list)  # name, base, new
    services: list[str] = field(default_factory=list)
    sysusers: list[str] = field(default_factory=list)
    tmpfiles: list[str] = field(default_factory=list)
    setid_removed: list[dict[str, str]] = field(default_factory=list)  # path, mode
    capabilities_removed: list[str] = field(default_factory=list)
    overridden_base_files: list[str] = field(default_factory=list)
    deletions_dropped: list[str] = field(default_factory=list)
    accounts_not_carried: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)  # path, reason

    def as_json(self) -> dict[str, Any]:
        users = [ln.split()[1] for ln in self.sysusers if ln.startswith("u ")]
        groups = [ln.split()[1] for ln in self.sysusers if ln.startswith("g ")]
        return {
            "name": self.name,
            "image": self.image,
            "format": self.format,
            "image_version": self.image_version,
            "base": self.base,
            "requested": self.requested,
            "packages": self.packages,
            "base_upgrades": self.base_upgrades,
            "services": self.services,
            "users": users,
            "groups": groups,
            "sysusers": self.sysusers,
            "tmpfiles": self.tmpfiles,
            "setid_removed": self.setid_removed,
            "capabilities_removed": self.capabilities_removed,
            "overridden_base_files": self.overridden_base_files,
            "deletions_dropped": self.deletions_dropped,
            "accounts_not_carried": self.accounts_not_carried,
            "dropped": self.dropped,
        }

    def as_text(self, list_overrides: bool) -> str:
        lines = [
            f"Wrote {self.image} ({self.format}): personality {self.name} "
            f"{self.image_version}, {len(self.packages)} packages.",
            f"  services: {' '.join(self.services) or 'none'}",
        ]
        users = ", ".join(self.as_json()["users"]) or "none"
        lines.append(f"  users (sysusers.d): {users}")
        lines.append(f"  tmpfiles.d lines: {len(self.tmpfiles)}")
        for item in self.setid_removed:
            lines.append(f"  set-id bits removed: {item['path']} (was {item['mode']})")
        for path in self.capabilities_removed:
            lines.append(f"  file capabilities removed: {path}")
        for upgrade in self.base_upgrades:
            lines.append(
                f"  base package upgraded into the personality: {upgrade['name']} "
                f"{upgrade['base']} -> {upgrade['new']}"
            )
        if list_overrides:
            lines += [f"  overrides base file: /{p}" for p in self.overridden_base_files]
        elif self.overridden_base_files:
            lines.append(f"  base files overridden: {len(self.overridden_base_files)} (see --json)")
        for what in self.accounts_not_carried:
            lines.append(f"  not carried: {what}")
        if self.deletions_dropped:
            lines.append(f"  deletions of base files not carried: {len(self.deletions_dropped)}")
        lines.append(f"  paths dropped: {len(self.dropped)} (see --json)")
        return "\n".join(lines)
