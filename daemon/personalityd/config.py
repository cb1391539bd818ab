"""The daemon's configuration: the settings, every key's validation, and reading the files.

Vendor defaults, then the admin file (or `--config`), then the drop-ins in lexical order;
later files override earlier ones key by key.
"""

from __future__ import annotations

import os
import posixpath
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from personalityd.core.errors import ConfigError
from personalityd.core.matching import DEFAULT_VOLUME_RULES, DEFAULT_WRITABLE_RULES, Rule
from personalityd.core.protected import DEFAULT_PROTECTED_PATHS

OverlayApi = Literal["auto", "lowerdir+", "legacy"]
SwapMode = Literal["auto", "beneath", "replace"]
Fallback = Literal["none", "tmpfs"]
ManageServices = Literal["auto", "yes", "no"]
Verify = Literal["none", "checksum", "signed"]

MAX_LAYERS = 500  # the kernel's limit on overlayfs lower layers

DEFAULT_SEARCH_PATHS = (
    "/etc/personalities",
    "/run/personalities",
    "/var/lib/personalities",
    "/usr/lib/personalities",
)
# systemd-sysext's own directories, searched after ours with `images.sysext_paths = true`.
SYSEXT_PATHS = (
    "/etc/extensions",
    "/run/extensions",
    "/var/lib/extensions",
    "/usr/local/lib/extensions",
    "/usr/lib/extensions",
)


@dataclass(frozen=True)
class Config:
    """Validated settings; paths are absolute and normalized, and relative to `root`."""

    root: Path = Path("/")
    mount_root: str = "/opt/personality"
    mount_options: tuple[str, ...] = ("ro", "nodev", "nosuid")
    volume_match: tuple[Rule, ...] = field(default=DEFAULT_VOLUME_RULES, hash=False)
    protected_paths: tuple[str, ...] = DEFAULT_PROTECTED_PATHS
    hierarchies: tuple[str, ...] = ("/usr", "/etc")
    overlay_api: OverlayApi = "auto"
    swap: SwapMode = "auto"
    max_layers: int = MAX_LAYERS
    writable_match: tuple[Rule, ...] = field(default=DEFAULT_WRITABLE_RULES, hash=False)
    writable_fallback: Fallback = "none"
    spool_dir: str = "/var/spool/personalityd"
    allowed_groups: tuple[str, ...] = ("personality",)
    state_dir: str = "/var/lib/personalityd"
    runtime_dir: str = "/run/personalityd"
    manage_services: ManageServices = "auto"
    block_signal: bool = False
    search_paths: tuple[str, ...] = DEFAULT_SEARCH_PATHS
    sysext_paths: bool = False
    verify: Verify = "none"
    history: int = 16  # generations kept in the history
    confirm_timeout: int = 0  # default trial length in seconds; 0: no trial

    def path(self, p: str) -> Path:
        """A configured absolute path (`/usr`) as it is found under `root`."""
        return self.root / p.lstrip("/")

    @property
    def mount_root_path(self) -> Path:
        return self.path(self.mount_root)

    @property
    def spool_path(self) -> Path:
        return self.path(self.spool_dir)

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def runtime_path(self) -> Path:
        return self.path(self.runtime_dir)

    @property
    def image_paths(self) -> tuple[str, ...]:
        """Where image files and directories are searched, in precedence order."""
        paths = self.search_paths + (SYSEXT_PATHS if self.sysext_paths else ())
        return tuple(dict.fromkeys(paths))


class _Bad(Exception):
    """A value that does not fit: what was expected, and the part of the value at fault."""

    def __init__(self, expected: str, value: object) -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value


def _absolute_path(value: object, expected: str = "an absolute path") -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad(expected, value)
    if ".." in value.split("/"):
        raise _Bad(expected + " without '..'", value)
    return "/" + posixpath.normpath(value).lstrip("/")


def _directory(value: object) -> str:
    path = _absolute_path(value, "an absolute path other than /")
    if path == "/":
        raise _Bad("an absolute path other than /", value)
    return path


def _absolute_paths(value: object, expected: str) -> list[str]:
    """A list of absolute paths other than /, normalized, in order."""
    if not isinstance(value, list):
        raise _Bad(expected, value)
    paths: list[str] = []
    for item in value:
        path = _absolute_path(item, expected)
        if path == "/":
            raise _Bad(expected + " other than /", item)
        paths.append(path)
    return paths


def _hierarchies(value: object) -> tuple[str, ...]:
    expected = "a list of absolute paths"
    paths = _absolute_paths(value, expected)
    for i, path in enumerate(paths):
        if any(_overlap(path, other) for other in paths[:i]):
            raise _Bad(expected + " that neither repeat nor nest", path)
    return tuple(paths)


def _protected_paths(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_absolute_paths(value, "a list of absolute paths")))


def _search_paths(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_absolute_paths(value, "a list of absolute paths")))


def _mount_options(value: object) -> tuple[str, ...]:
    expected = "a list of mount options (one per item) without 'rw': volumes are read-only"
    if not isinstance(value, list):
        raise _Bad(expected, value)
    for item in value:
        if not isinstance(item, str) or not item or "," in item or item.strip() != item:
            raise _Bad(expected, item)
        if item == "rw":
            raise _Bad(expected, item)
    return tuple(value)


def _rules(value: object) -> tuple[Rule, ...]:
    expected = "a list of tables mapping udev properties to shell globs (strings)"
    if not isinstance(value, list):
        raise _Bad(expected, value)
    rules: list[Rule] = []
    for item in value:
        if not isinstance(item, dict) or not item:
            raise _Bad(expected + ", none empty", item)
        for key, pattern in item.items():
            if not isinstance(key, str) or not key or not isinstance(pattern, str):
                raise _Bad(expected, item)
        rules.append(MappingProxyType(dict(item)))
    return tuple(rules)


def _groups(value: object) -> tuple[str, ...]:
    expected = "a list of group names"
    if not isinstance(value, list):
        raise _Bad(expected, value)
    for item in value:
        if not isinstance(item, str) or not item or any(c in item for c in " \t\n:,/"):
            raise _Bad(expected, item)
    return tuple(value)


def _choice(*choices: str) -> Callable[[object], str]:
    expected = "one of " + ", ".join(f'"{c}"' for c in choices)

    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(expected, value)
        return value

    return check


def _count(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Bad(f"an integer from {low} to {high}", value)
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false", value)
    return value


# Dotted key -> (Config field, validator).
KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "root": ("root", _absolute_path),
    "volumes.mount_root": ("mount_root", _directory),
    "volumes.mount_options": ("mount_options", _mount_options),
    "volumes.match": ("volume_match", _rules),
    "volumes.protected_paths": ("protected_paths", _protected_paths),
    "stack.hierarchies": ("hierarchies", _hierarchies),
    "stack.overlay_api": ("overlay_api", _choice("auto", "lowerdir+", "legacy")),
    "stack.swap": ("swap", _choice("auto", "beneath", "replace")),
    "stack.max_layers": ("max_layers", _count(1, MAX_LAYERS)),
    "writable.match": ("writable_match", _rules),
    "writable.fallback": ("writable_fallback", _choice("none", "tmpfs")),
    "spool.dir": ("spool_dir", _directory),
    "spool.allowed_groups": ("allowed_groups", _groups),
    "state.dir": ("state_dir", _directory),
    "state.runtime_dir": ("runtime_dir", _directory),
    "systemd.manage_services": ("manage_services", _choice("auto", "yes", "no")),
    "debug.block_signal": ("block_signal", _boolean),
    "images.search_paths": ("search_paths", _search_paths),
    "images.sysext_paths": ("sysext_paths", _boolean),
    "images.verify": ("verify", _choice("none", "checksum", "signed")),
    "state.history": ("history", _count(2, 10_000)),
    "transactions.confirm_timeout": ("confirm_timeout", _count(0, 2**32 - 1)),
}
TABLES = frozenset(key.partition(".")[0] for key in KEYS if "." in key)


def build_config(
    sources: Sequence[tuple[str, Mapping[str, Any]]],
    root_override: str | None,
) -> tuple[Config, list[str]]:
    """Merge parsed TOML files (increasing precedence) into a Config, plus warnings.

    Later files override earlier ones key by key (lists replace). Unknown keys give a
    warning naming file and key; a bad value raises ConfigError naming file, key and the
    expected form. `root_override` (`--root`, absolute) replaces the `root` key.
    """
    values: dict[str, tuple[object, str]] = {}  # dotted key -> (value, file that set it)
    warnings: list[str] = []
    for file, data in sources:
        for key, value in data.items():
            if key in TABLES:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{file}: {key} must be a table, got {_show(value)}")
                for subkey, subvalue in value.items():
                    dotted = f"{key}.{subkey}"
                    if dotted in KEYS:
                        values[dotted] = (subvalue, file)
                    else:
                        warnings.append(f"{file}: unknown key {dotted!r}")
            elif key in KEYS:
                values[key] = (value, file)
            else:
                warnings.append(f"{file}: unknown key {key!r}")

    settings: dict[str, Any] = {}
    for dotted, (value, file) in values.items():
        name, check = KEYS[dotted]
        try:
            settings[name] = check(value)
        except _Bad as bad:
            raise ConfigError(
                f"{file}: {dotted} must be {bad.expected}, got {_show(bad.value)}"
            ) from None
    if root_override is not None:
        try:
            settings["root"] = _absolute_path(root_override)
        except _Bad:
            raise ConfigError(
                f"--root must be an absolute path without '..', got {_show(root_override)}"
            ) from None
    settings["root"] = Path(settings.get("root", "/"))
    config = Config(**settings)

    for hierarchy in config.hierarchies:
        if _overlap(hierarchy, config.mount_root):
            if "stack.hierarchies" in values:
                where = f"{values['stack.hierarchies'][1]}: stack.hierarchies"
            else:
                where = f"{values['volumes.mount_root'][1]}: volumes.mount_root"
            raise ConfigError(
                f"{where}: the hierarchy {hierarchy!r} and volumes.mount_root "
                f"{config.mount_root!r} must not contain one another"
            )
    return config, warnings


def _overlap(a: str, b: str) -> bool:
    """Whether one of two normalized absolute paths is the other or inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _show(value: object) -> str:
    """A value in TOML spelling, cut short."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = repr(value)
    elif isinstance(value, list):
        shown = "[" + ", ".join(_show(item) for item in value) + "]"
    elif isinstance(value, Mapping):
        shown = "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    else:
        shown = str(value)
    return shown if len(shown) <= 100 else shown[:97] + "..."


# -- reading the files --------------------------------------------------------------------

VENDOR_CONFIG = "/usr/lib/personalityd/personalityd.toml"
ADMIN_CONFIG = "/etc/personalityd/personalityd.toml"

Sources = list[tuple[str, dict[str, Any]]]  # (file, parsed TOML), in increasing precedence


def load_config(
    config_file: str | None,
    root_override: str | None,
    vendor: str | None = None,
    admin: str | None = None,
) -> tuple[Config, list[str]]:
    """Read and validate the configuration; returns it with warnings (unknown keys).

    The files are those of `read_config_sources`. Raises ConfigError."""
    sources = read_config_sources(config_file, root_override, vendor, admin)
    return build_config(sources, absolute_root(root_override))


def read_config_sources(
    config_file: str | None,
    root_override: str | None,
    vendor: str | None = None,
    admin: str | None = None,
) -> Sources:
    """The configuration files, parsed, in the order they apply.

    The vendor file, then `config_file` (`--config`, which must exist) or else the admin
    file, then the drop-ins `<admin>.d/*.toml` in lexical order (also with `--config`). With
    `--root DIR` (`root_override`) the vendor and admin files are those under DIR, like every
    other path; the `root` key of a file cannot move them (it is read from them). `vendor` and
    `admin` replace the default locations (tests). Raises ConfigError."""
    prefix = absolute_root(root_override) or "/"
    vendor = vendor or _under(prefix, VENDOR_CONFIG)
    admin = admin or _under(prefix, ADMIN_CONFIG)
    sources: Sources = []
    for path, required in ((vendor, False), (config_file or admin, config_file is not None)):
        data = _read(path, required)
        if data is not None:
            sources.append((path, data))
    for path in drop_ins(admin):
        data = _read(path, required=False)
        if data is not None:
            sources.append((path, data))
    return sources


def absolute_root(root_override: str | None) -> str | None:
    """`--root` made absolute (from the current directory), or None."""
    return None if root_override is None else os.path.abspath(root_override)


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def drop_ins(admin: str = ADMIN_CONFIG) -> list[str]:
    """The drop-in files of `admin` in the order they apply (lexical; dotfiles ignored)."""
    directory = Path(admin + ".d")
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{directory}: cannot read: {e.strerror}") from None
    return [
        str(p)
        for p in entries
        if p.name.endswith(".toml") and not p.name.startswith(".") and p.is_file()
    ]


def _read(path: str, required: bool) -> dict[str, Any] | None:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
