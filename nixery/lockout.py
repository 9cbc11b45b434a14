"""Failed logins, counted across Gunicorn's workers per client address and per user.

A password check costs a bcrypt hash by design, so guessing is slowed and then
stopped: each failure from an address holds its 401 back longer (doubling, capped),
and after `limit` attempts in a row an address, or a user name, gets 429 without a
check until `pause` seconds pass without one. Workers share nothing in memory, and
counts kept per worker would let N workers check N times as many guesses, so the
counts live on disk, in one fixed-size table file (as nixery/failures.py keeps
failed builds): `BUCKETS` buckets of `WAYS` records, the bucket chosen by a hash of
the address or user, each bucket read and written under its own lock.

An attempt is counted when it is admitted, before its password is checked, so
that a burst of concurrent guesses cannot all pass the check of the count before
any of them has failed: at most `limit` checks are made per address and per user.
A login that passes clears its address and takes its attempt back from its user.
The user names counted are those the client sent (hashed): an attacker trying
names locks those names, which is what a lockout per user means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import struct
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from .locks import file_lock

TABLE_FILE = "logins"
BUCKETS = 4096
WAYS = 8
# A record: the key's hash, the count of attempts, when the last one was made (seconds since the epoch).
_RECORD = struct.Struct("<16sId4x")
BUCKET_SIZE = WAYS * _RECORD.size


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What `FailedLogins.admit` decided: `retry_after` seconds to wait (0: admitted, and counted),
    and `delay`, how long to hold back the answer if this attempt fails."""

    retry_after: float
    delay: float = 0.0


def _key(kind: str, value: str) -> bytes:
    return hashlib.sha256(f"{kind}\0{value}".encode(errors="replace")).digest()[:16]


class FailedLogins:
    """`directory` holds the table (the state layout's `memory`), `lock_dir` its locks."""

    def __init__(self, directory: Path, lock_dir: Path, *, base_delay: float = 0.05, max_delay: float = 1.0,
                 limit: int = 20, pause: float = 60.0, clock: Callable[[], float] = time.time):
        self.path = directory / TABLE_FILE
        self.lock_dir = lock_dir
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.limit = limit
        self.pause = pause
        self.clock = clock

    @staticmethod
    def _keys(address: str, user: Optional[str]) -> list[bytes]:
        return [_key("address", address)] + ([_key("user", user)] if user is not None else [])

    @contextlib.contextmanager
    def _buckets(self, keys: list[bytes]) -> Iterator[int]:
        """The table's descriptor, holding the locks of the keys' buckets (in order: no deadlock)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for bucket in sorted({self._bucket(key) for key in keys}):
                stack.enter_context(file_lock(self.lock_dir, f"logins {bucket}"))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)
            yield fd

    @staticmethod
    def _bucket(key: bytes) -> int:
        return int.from_bytes(key[:4], "big") % BUCKETS

    def _read(self, fd: int, key: bytes, now: float) -> tuple[int, int, float]:
        """(way, count, last) of `key`; for a key not there (or whose pause is over), count 0 and
        the way it may take: an empty or expired record, else the one that failed longest ago."""
        bucket = self._bucket(key)
        raw = os.pread(fd, BUCKET_SIZE, bucket * BUCKET_SIZE).ljust(BUCKET_SIZE, b"\0")
        records = [_RECORD.unpack_from(raw, way * _RECORD.size) for way in range(WAYS)]
        for way, (stored, count, last) in enumerate(records):
            if stored == key:
                return (way, count, last) if now - last < self.pause else (way, 0, now)
        way = min(range(WAYS), key=lambda i: records[i][2] if now - records[i][2] < self.pause else 0.0)
        return way, 0, now

    def _write(self, fd: int, key: bytes, way: int, count: int, last: float) -> None:
        offset = self._bucket(key) * BUCKET_SIZE + way * _RECORD.size
        os.pwrite(fd, _RECORD.pack(key if count else b"\0" * 16, count, last if count else 0.0), offset)

    def retry_after(self, address: str) -> float:
        """Seconds before `address` may try again; 0 when it may now (nothing is counted)."""
        key = _key("address", address)
        with self._buckets([key]) as fd:
            now = self.clock()
            _, count, last = self._read(fd, key, now)
        return self.pause - (now - last) if count >= self.limit else 0.0

    def admit(self, address: str, user: Optional[str]) -> Attempt:
        """Counts an attempt of `user` (None for a token) from `address` that is about to be checked,
        unless either has `limit` attempts in a row already."""
        keys = self._keys(address, user)
        with self._buckets(keys) as fd:
            now = self.clock()
            found = [self._read(fd, key, now) for key in keys]
            waits = [self.pause - (now - last) for _, count, last in found if count >= self.limit]
            if waits:
                return Attempt(retry_after=max(waits))
            for key, (way, count, _) in zip(keys, found):
                self._write(fd, key, way, count + 1, now)
        address_count = found[0][1] + 1
        return Attempt(0.0, min(self.max_delay, self.base_delay * 2 ** (address_count - 1)))

    def succeeded(self, address: str, user: Optional[str] = None) -> None:
        """A login passed: the address starts again from nothing, and the user's admitted attempt
        (when one was counted) is taken back."""
        keys = self._keys(address, user)
        with self._buckets(keys) as fd:
            now = self.clock()
            for index, key in enumerate(keys):
                way, count, last = self._read(fd, key, now)
                if count:
                    self._write(fd, key, way, 0 if index == 0 else count - 1, last)
