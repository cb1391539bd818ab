"""Which files a process opened: inotify `IN_OPEN` watches on directories.

A watch is on an inode, not on a mount: it sees every open of a file in the watched directory
through any mount of the same filesystem (a detached probe mount, a bind, an overlay's lower
layer). The tests use it to show that the daemon never opens a FIFO, a device node or a symlink
target that a volume names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterable
from pathlib import Path

IN_OPEN = 0x00000020
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class OpenWatch:
    """`IN_OPEN` watches on `directories`; `opened()` lists (directory, name) of the entries
    opened in them since the watch began (directories themselves excluded)."""

    def __init__(self, directories: Iterable[Path]) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._dirs: dict[int, Path] = {}
        self._seen: list[tuple[Path, str]] = []
        for directory in directories:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_OPEN)
            if wd < 0:
                errno = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(errno, f"inotify_add_watch {directory}: {os.strerror(errno)}")
            self._dirs[wd] = directory

    def opened(self) -> list[tuple[Path, str]]:
        """Every (directory, name) opened so far (files, FIFOs, devices, sockets)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                if name and not mask & IN_ISDIR and wd in self._dirs:
                    self._seen.append((self._dirs[wd], name))
        return list(self._seen)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
