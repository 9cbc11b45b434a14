"""Locks that hold across Gunicorn's worker processes (and threads), in a bounded number of files.

Workers share nothing in memory, so "one build per image at a time" has to be
a lock on disk. Every named lock is one byte of a single sparse file, locked
with an open-file-description lock (`F_OFD_SETLKW`): the byte's offset is a
hash of the name, so a million distinct names (requested by clients, most of
them rejected) leave one file, not a million. OFD locks belong to the open
file description, so two threads of one process exclude each other as two
processes do, and the kernel drops them when a holder dies.

`Slots` builds counted semaphores from the same bytes: at most N holders at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = "ranges"
# Offsets stay below 2**62 (off_t is signed 64-bit); the file never grows, locks take no space.
_OFFSET_SPACE = 1 << 62
_SLOT_POLL_SECONDS = 0.1


def _offset(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % _OFFSET_SPACE


def _flock_struct(kind: int, offset: int) -> bytes:
    # struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t, 0 for OFD locks).
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


def _open(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try(fd: int, offset: int, wait: bool) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK, offset))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


@contextlib.contextmanager
def file_lock(directory: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """Holds the lock called `name`, blocking until it is free, and yields True; with `wait=False`,
    yields False at once (holding nothing) when another holds it."""
    fd = _open(directory)
    try:
        yield _try(fd, _offset(name), wait=wait)
    finally:
        os.close(fd)  # closing the description releases its locks


def try_lock(fd: int) -> bool:
    """Takes the lock on the first byte of `fd`'s file, held until `fd` is closed; False at once
    when another holds it."""
    return _try(fd, 0, wait=False)


def wait_until_free(directory: Path, name: str) -> None:
    """Returns once nobody holds the lock called `name` (taking it for an instant)."""
    with file_lock(directory, name):
        pass


class Slots:
    """At most `count` holders of `name` at once across all workers (one lock byte per slot)."""

    def __init__(self, directory: Path, name: str, count: int):
        self.directory = directory
        self.offsets = [_offset(f"{name}#{i}") for i in range(count)]

    def _take(self, fd: int) -> bool:
        return any(_try(fd, offset, wait=False) for offset in self.offsets)

    @contextlib.contextmanager
    def hold(self, wait: bool = True) -> Iterator[bool]:
        """Yields True holding a slot; with `wait=False`, yields False at once when all are taken.
        A waiter polls every 0.1 s: it sleeps, holding no thread of CPU and no file."""
        fd = _open(self.directory)
        try:
            taken = self._take(fd)
            while not taken and wait:
                time.sleep(_SLOT_POLL_SECONDS)
                taken = self._take(fd)
            yield taken
        finally:
            os.close(fd)

    def wait_free(self) -> None:
        """Returns once a slot is free (taking it for an instant)."""
        with self.hold():
            pass
