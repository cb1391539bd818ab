"""personalityd run as a subprocess on a sandbox root, the way a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testkit.config import deep_merge, to_toml
from testkit.contract import DEFAULT_PATHS, READY_EVENT
from testkit.paths import REPO
from testkit.spool import spool_request
from testkit.udev import TEST_PROPERTY


def base_config(root: Path, udev_token: str | None) -> dict[str, Any]:
    """`root`, the default paths, and (with a token) match rules for tagged devices."""
    config: dict[str, Any] = {
        "root": str(root),
        "volumes": {"mount_root": DEFAULT_PATHS["mount_root"]},
        "writable": {"fallback": "none"},
        "spool": {"dir": DEFAULT_PATHS["spool"]},
        "state": {"dir": DEFAULT_PATHS["state"], "runtime_dir": DEFAULT_PATHS["runtime"]},
    }
    if udev_token is not None:
        config["volumes"]["match"] = [{TEST_PROPERTY: udev_token}]
        config["writable"]["match"] = [
            {"ID_FS_LABEL": "personality-data", TEST_PROPERTY: udev_token}
        ]
    return config


class Daemon:
    """personalityd run as a subprocess on a sandbox root, the way a user starts it.

    `python -m personalityd --config CFG --root ROOT`, stderr appended to `log_path`. The config
    sets `root`, the default paths (relative to root), and, when `udev_token` is given,
    `volumes.match` / `writable.match` restricted to loop devices tagged by `udev_tag_rule`.
    `config` overrides are deep-merged on top (None deletes a key).
    """

    def __init__(
        self,
        root: Path,
        workdir: Path,
        *,
        udev_token: str | None = None,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "personalityd",
    ) -> None:
        self.root = root
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.env = dict(env or {})
        self.config: dict[str, Any] = deep_merge(base_config(root, udev_token), config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # The Python that runs `-m personalityd` (another one must find the project's
        # dependencies through PYTHONPATH in `env`).
        self.interpreter = sys.executable

    # paths, as configured, seen from the test (outside the daemon's root prefix)
    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @property
    def spool_dir(self) -> Path:
        return self.path(self.config.get("spool", {}).get("dir", DEFAULT_PATHS["spool"]))

    @property
    def state_dir(self) -> Path:
        return self.path(self.config.get("state", {}).get("dir", DEFAULT_PATHS["state"]))

    @property
    def runtime_dir(self) -> Path:
        state = self.config.get("state", {})
        return self.path(state.get("runtime_dir", DEFAULT_PATHS["runtime"]))

    @property
    def mount_root(self) -> Path:
        volumes = self.config.get("volumes", {})
        return self.path(volumes.get("mount_root", DEFAULT_PATHS["mount_root"]))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def update_config(self, overrides: Mapping[str, Any]) -> None:
        """Deep-merge `overrides` into the config; takes effect at the next (re)start."""
        self.config = deep_merge(self.config, overrides)

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "daemon"), env.get("PYTHONPATH")) if p
        )
        env.update(self.env)
        return env

    def start(self, wait: bool = True, timeout: float = 30) -> None:
        """Write the config, start the daemon, and (by default) `wait_ready()`."""
        if self.running():
            raise AssertionError(f"{self.name} is already running (PID {self.pid})")
        self.write_config()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            marker = f"--- {self.name} started at {time.strftime('%H:%M:%S')} ---\n"
            log.write(marker.encode())
            log.flush()
            self._log_offset += len(marker)
            self.proc = subprocess.Popen(
                [
                    self.interpreter,
                    "-m",
                    "personalityd",
                    "--config",
                    str(self.config_path),
                    "--root",
                    str(self.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._environment(),
                cwd=self.config_path.parent,
            )
        if wait:
            self.wait_ready(timeout)

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ready(self) -> bool:
        """The spool and state dirs exist and this run has logged `daemon_ready`."""
        return (
            self.spool_dir.is_dir()
            and self.state_dir.is_dir()
            and READY_EVENT in self._log_since_start()
        )

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait for `ready()`; fail at once (with the log) if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(
                    f"{self.name} exited (status {code}) before {READY_EVENT}:\n"
                    + self._log_since_start()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} not ready after {timeout} s:\n" + self._log_since_start()
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit status (None if not run)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon (a crash: no cleanup runs) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, wait: bool = True, timeout: float = 30) -> None:
        self.stop()
        self.start(wait=wait, timeout=timeout)

    def log_text(self) -> str:
        """Everything the daemon wrote to stderr/stdout, over all (re)starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss(self) -> int:
        """The daemon's resident set (VmRSS) in bytes."""
        if self.pid is None:
            raise AssertionError(f"{self.name} was not started")
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                return int(value.split()[0]) * 1024
        raise AssertionError(f"no VmRSS for {self.name} (PID {self.pid})")

    def request(
        self, body: Mapping[str, Any], name: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """`spool_request` against this daemon's spool dir."""
        return spool_request(self.root, body, name=name, timeout=timeout, spool_dir=self.spool_dir)
