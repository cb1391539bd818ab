"""personalityd: wiring of config, event sources, the manager and the front ends."""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import platform
import signal
import sys
import time
from pathlib import Path

import structlog

from personalityd import __version__
from personalityd.adapters import notify
from personalityd.adapters.baseview import load_base_settings
from personalityd.adapters.imagedirs import SearchPathWatcher
from personalityd.adapters.imagefile import Place
from personalityd.adapters.journal import Journal
from personalityd.adapters.mountinfo import read_mountinfo, sysext_merges
from personalityd.adapters.selfexec import run_from_base
from personalityd.adapters.spool import ensure_spool_dirs
from personalityd.adapters.state import load_state
from personalityd.adapters.systemd import ServiceManager, connect_service_manager
from personalityd.adapters.udev import UdevMonitor
from personalityd.config import Config
from personalityd.core.errors import ConfigError, PersonalityError
from personalityd.core.model import OsRelease
from personalityd.core.osrelease import base_os_release, parse_os_release, systemd_architecture
from personalityd.frontends.spool import SpoolService
from personalityd.log import setup_logging
from personalityd.stack.engine import Engine, detect_features
from personalityd.stack.images import ImageVolumes
from personalityd.stack.layout import Layout
from personalityd.stack.manager import Manager
from personalityd.stack.registry import VolumeRegistry, protected_check

log = structlog.get_logger()

DBUS_RETRY_SECONDS = 5.0


def base_identity(config: Config, text: str | None) -> OsRelease:
    """The base's OsRelease from the text of its os-release (read by adapters/baseview.py)."""
    architecture = systemd_architecture(platform.machine())
    if text is None:
        log.warning("base_os_release_missing", root=str(config.root))
        return OsRelease(id="", architecture=architecture)
    return base_os_release(parse_os_release(text), architecture)


def sysext_notice(hierarchies: list[str]) -> str:
    where = ", ".join(hierarchies)
    return (
        f"systemd-sysext has extensions merged on {where}: personalityd stacks over that "
        "merge, and while personalities are stacked on top of it `systemd-sysext refresh` "
        "cannot mount a new merge (overlay nesting) and `unmerge` leaves it in place; to move "
        "the extensions over, run `systemd-sysext unmerge` and set images.sysext_paths = true, "
        "which serves the same image files"
    )


def ensure_directories(config: Config) -> None:
    """Create what the daemon needs under root, as tmpfiles.d does on an installed system."""
    try:
        group = grp.getgrnam(config.allowed_groups[0]).gr_gid if config.allowed_groups else None
    except KeyError:
        group = None
    ensure_spool_dirs(config.spool_path, group)
    for directory, mode in (
        (config.state_path, 0o700),
        (config.runtime_path, 0o755),
        (config.mount_root_path, 0o755),
    ):
        if not directory.is_dir():
            directory.mkdir(mode=mode, parents=True)
            os.chmod(directory, mode)


class Daemon:
    def __init__(self, config: Config, base: OsRelease) -> None:
        self.config = config
        self.base = base
        self.stopping = asyncio.Event()
        self.ready = False

    async def run(self) -> int:
        config = self.config
        notify.status("starting")
        ensure_directories(config)
        state = load_state(config.state_path)
        runtime = config.runtime_path
        features = detect_features(config, str(runtime / "probe"))
        journal = Journal()
        engine = Engine(config, features)
        sysext = sysext_merges(
            read_mountinfo(), {h: str(config.path(h)) for h in config.hierarchies}
        )
        place = Place(
            root=str(config.root),
            views={h: engine.layout.base_ref(h) for h in config.hierarchies},
            verify=config.verify,
            architecture=self.base.architecture,
            mount_options=tuple(config.mount_options),
            hierarchies=tuple(config.hierarchies),
            scratch=str(runtime / "probe"),
        )
        images = ImageVolumes(
            place,
            config.image_paths,
            self.base,
            engine.layout.loops_file,
            journal.volume_refused,
            protected_check(config),
        )
        registry = VolumeRegistry(config, self.base, journal.volume_refused, images)
        services = await self._service_manager()
        manager = Manager(config, engine, registry, journal, state, services=services)
        if sysext:
            notice = sysext_notice(sysext)
            log.warning("sysext_merged", hierarchies=" ".join(sysext), notice=notice)
            manager.add_notice(notice)
        engine.prepare_base_references()
        monitor = UdevMonitor()
        monitor.start()
        watcher = SearchPathWatcher(place.root, config.image_paths, place.views)
        try:
            notify.status("probing devices and restoring the stack")
            await manager.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(manager.run())
                tasks.create_task(manager.follower.run())
                tasks.create_task(self._forward_udev(monitor, manager))
                tasks.create_task(self._forward_images(watcher, manager))
                tasks.create_task(manager.watch_draining())
                tasks.create_task(SpoolService(config, manager).run())
                tasks.create_task(self._dbus(manager))
                tasks.create_task(self._watchdog())
                self._install_signals()
                notify.ready()
                # Units that depend on a personality (Requires=personality@NAME.service) find
                # it active for every personality restored at start (stack/follower.py).
                manager.follower.start_units(manager.attached)
                notify.status(self._status_line(manager))
                manager.subscribe(lambda _event: notify.status(self._status_line(manager)))
                log.info(
                    "daemon_ready",
                    version=__version__,
                    generation=manager.generation,
                    attached=" ".join(manager.attached),
                    root=str(config.root),
                )
                await self.stopping.wait()
                notify.stopping()
                log.info("daemon_stopping", attached=" ".join(manager.attached))
                await manager.stop()
                manager.follower.flush()
                await asyncio.sleep(0.1)  # let the Busy replies of waiting callers go out
                raise _Stop
        except* _Stop:
            pass
        finally:
            monitor.stop()
            watcher.close()
            images.close()
        return 0

    @staticmethod
    def _status_line(manager: Manager) -> str:
        attached = " ".join(manager.attached) or "nothing"
        return f"generation {manager.generation}: {attached} attached"

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        if self.config.block_signal:
            # Lets tests prove that systemd's watchdog restarts a daemon whose loop hangs.
            loop.add_signal_handler(signal.SIGUSR2, lambda: time.sleep(1e6))

    async def _forward_udev(self, monitor: UdevMonitor, manager: Manager) -> None:
        async for event in monitor.events():
            manager.device_event(event)

    async def _forward_images(self, watcher: SearchPathWatcher, manager: Manager) -> None:
        async for _ in watcher.changes():
            manager.images_event()

    async def _watchdog(self) -> None:
        interval = notify.watchdog_interval()
        if interval is None:
            return
        while True:
            notify.watchdog()
            await asyncio.sleep(interval / 3)

    async def _dbus(self, manager: Manager) -> None:
        """Serve on the system bus; keep trying while the bus is not there yet."""
        warned = False
        while True:
            try:
                from personalityd.frontends.dbus.service import serve

                bus = await serve(manager)
            except Exception as exc:  # no bus, or the name is not ours to own
                if not warned:
                    log.warning("dbus_unavailable", error=str(exc), retry_seconds=5)
                    warned = True
                await asyncio.sleep(DBUS_RETRY_SECONDS)
                continue
            log.info("dbus_ready")
            try:
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # untyped in dbus-fast
                log.warning("dbus_disconnected")
            except Exception as exc:  # dbus-fast hands on its reader's error: EOFError, OSError
                log.warning("dbus_disconnected", error=str(exc) or type(exc).__name__)
            finally:
                bus.disconnect()
            warned = False

    async def _service_manager(self) -> ServiceManager | None:
        if self.config.manage_services == "no":
            return None
        if self.config.manage_services == "auto" and (
            str(self.config.root) != "/" or not Path("/run/systemd/system").is_dir()
        ):
            return None
        return await connect_service_manager()


class _Stop(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="personalityd",
        description="Stack read-only personality volumes over the base OS with overlayfs.",
    )
    parser.add_argument("--config", metavar="FILE", help="use FILE instead of the admin file")
    parser.add_argument("--root", metavar="DIR", help="take every path relative to DIR")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PERSONALITYD_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    parser.add_argument("--version", action="version", version=f"personalityd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        # From the base, never through a stack (a personality must not configure us).
        settings = load_base_settings(args.config, args.root)
    except ConfigError as exc:
        print(f"personalityd: {exc}", file=sys.stderr)
        return 1
    config, warnings = settings.config, settings.warnings
    for warning in warnings:
        log.warning("config_warning", message=warning)
    if os.geteuid() != 0:
        print("personalityd: must run as root (it mounts filesystems)", file=sys.stderr)
        return 1
    # From the base too: never the interpreter, libraries or code of a stack (returns when
    # nothing of ours is mapped from one; else this process is replaced).
    layout = Layout(config)
    run_from_base({str(config.path(h)): layout.base_ref(h) for h in config.hierarchies})
    # Indexing and conflict detection run in worker threads; a short GIL switch interval
    # lets the event loop answer readers (D-Bus, spool) within a millisecond or so meanwhile.
    sys.setswitchinterval(0.001)
    try:
        return asyncio.run(Daemon(config, base_identity(config, settings.os_release)).run())
    except PersonalityError as exc:
        print(f"personalityd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
