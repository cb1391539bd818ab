"""Reading the config files: vendor defaults, the admin file (or --config), then drop-ins."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from personalityd.core.config import Config, build_config
from personalityd.core.errors import ConfigError

VENDOR_CONFIG = "/usr/lib/personalityd/personalityd.toml"
ADMIN_CONFIG = "/etc/personalityd/personalityd.toml"


def load_config(
    config_file: str | None,
    root_override: str | None,
    vendor: str = VENDOR_CONFIG,
    admin: str = ADMIN_CONFIG,
) -> tuple[Config, list[str]]:
    """Read and validate the configuration; returns it with warnings (unknown keys).

    `config_file` (`--config`) replaces the admin file and must exist; the vendor and admin
    files may be missing. Drop-ins are `<admin>.d/*.toml` in lexical order, also with
    `--config`. These files are on the real `/`, never under `root`. Raises ConfigError.
    """
    sources: list[tuple[str, dict[str, Any]]] = []
    for path, required in ((vendor, False), (config_file or admin, config_file is not None)):
        data = _read(path, required)
        if data is not None:
            sources.append((path, data))
    for path in drop_ins(admin):
        data = _read(path, required=False)
        if data is not None:
            sources.append((path, data))
    if root_override is not None:
        root_override = os.path.abspath(root_override)
    return build_config(sources, root_override)


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
