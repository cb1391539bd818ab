"""udev property match rules: which block devices are personality or writable volumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from types import MappingProxyType

Rule = Mapping[str, str]

FS_TYPE = "ID_FS_TYPE"

DEFAULT_VOLUME_RULES: tuple[Rule, ...] = (
    MappingProxyType({FS_TYPE: "squashfs"}),
    MappingProxyType({FS_TYPE: "erofs"}),
    MappingProxyType({"ID_FS_LABEL": "personality-*"}),
    MappingProxyType({"ID_PART_ENTRY_NAME": "personality-*"}),
    MappingProxyType({"PERSONALITYD_VOLUME": "1"}),
)

DEFAULT_WRITABLE_RULES: tuple[Rule, ...] = (MappingProxyType({"ID_FS_LABEL": "personality-data"}),)


def rule_matches(rule: Rule, properties: Mapping[str, str]) -> bool:
    """Every key of `rule` is a property whose value matches the key's shell glob.

    A missing property never matches; an empty rule matches nothing.
    """
    if not rule:
        return False
    for key, pattern in rule.items():
        value = properties.get(key)
        if value is None or not fnmatchcase(value, pattern):
            return False
    return True


def matches_any(rules: Sequence[Rule], properties: Mapping[str, str]) -> bool:
    return any(rule_matches(rule, properties) for rule in rules)


def matched_only_by_fs_type(rules: Sequence[Rule], properties: Mapping[str, str]) -> bool:
    """True when some rule matched and every rule that matched is keyed on ID_FS_TYPE alone.

    Such a device (a squashfs snap, say) without a manifest is skipped at debug level.
    """
    matched = [rule for rule in rules if rule_matches(rule, properties)]
    return bool(matched) and all(set(rule) == {FS_TYPE} for rule in matched)
