"""Failed builds and unknown names, remembered for a short while per source revision, and
failed derivations, remembered whatever image needed them.

A retry storm (CI re-pulling a broken image, a scanner trying names) must not
run Nix again and again: the first failure's answer is kept for
`NIXERY_FAILURE_TTL` seconds under the image's key, which includes the source
revision, so a new commit is built at once. Names that differ but need the same
failing derivation (`failing/a`, `failing/b`, ...) are different images: for
them the derivation itself is remembered (its .drv path names its inputs, so the
same path fails the same way), and an image whose build needs it gets the
failure without building it again.

Workers share nothing in memory, so the answers live on disk, in fixed-size
table files: buckets of `WAYS` records of a fixed size, the bucket chosen by
the key's hash. State stays bounded whatever clients ask for; a new answer
takes its key's old record, else an expired one, else the one expiring first,
so thousands of live answers are kept before any is lost.

Only failures that would repeat are kept: Nix's own failures, unknown
packages, unsupported systems and registry errors. A storage fault is not
the image's fault and is never remembered.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

from .errors import RegistryError
from .locks import file_lock
from .nix import (BuildFailed, BuildTimedOut, DerivationFailed, NixError, UnknownPackages, UnsupportedSystem,
                  first_error_line)
from .refusals import ImageTooLarge
from .sources import SourceError
from .storage import StorageError

# What would repeat: the package set's answers and Nix's; a storage fault is the instance's, not the image's.
REMEMBERED = (RegistryError, NixError, UnknownPackages, UnsupportedSystem, ImageTooLarge, SourceError)

TABLE_FILE = "failures"
BUCKETS = 1024
WAYS = 8
RECORD_SIZE = 2048
# Failed derivations: few at a time, and every new build reads them all, so a small table.
DERIVATIONS_FILE = "failed-derivations"
DERIVATION_BUCKETS = 64
DERIVATION_RECORD_SIZE = 1024
# Nix's line about a failed derivation, as kept (the record must fit).
LINE_KEPT = 400


def encode(error: RegistryError) -> dict[str, Any]:
    return {"status": error.status, "code": error.code, "message": error.message, "detail": error.detail,
            "headers": error.headers}


def decode(data: dict[str, Any]) -> RegistryError:
    error = RegistryError(data["status"], data["code"], data["message"], data.get("detail"))
    error.headers.update(data.get("headers") or {})
    return error


def _parse(raw: bytes) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(raw.strip(b"\0 ") or b"null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Table:
    """A file of `buckets` buckets of `WAYS` JSON records of `record_size` bytes, each with its
    "key" (a hex digest) and the time it is kept "until"; a bucket is read and written under its lock."""

    def __init__(self, path: Path, lock_dir: Path, buckets: int, record_size: int):
        self.path = path
        self.lock_dir = lock_dir
        self.buckets = buckets
        self.record_size = record_size

    def _bucket(self, key: str) -> int:
        return int(key[:12], 16) % self.buckets

    def _records(self, fd: int, bucket: int) -> list[Optional[dict[str, Any]]]:
        size = WAYS * self.record_size
        raw = os.pread(fd, size, bucket * size).ljust(size, b"\0")
        return [_parse(raw[i * self.record_size:(i + 1) * self.record_size]) for i in range(WAYS)]

    def _lock(self, bucket: int) -> ContextManager[None]:
        return file_lock(self.lock_dir, f"{self.path.name} bucket {bucket}")

    def put(self, key: str, ttl: int, record: dict[str, Any]) -> None:
        """Keeps `record` under `key` for `ttl` seconds; a record too long to keep is dropped."""
        data = json.dumps({"key": key, "until": time.time() + ttl, **record}, ensure_ascii=False).encode()
        if len(data) > self.record_size:
            return  # an answer too long to keep is built again next time
        bucket = self._bucket(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(bucket):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                records = self._records(fd, bucket)
                # Its own old record, else an empty or expired one, else the one expiring first.
                way = min(range(WAYS), key=lambda i: (
                    0 if records[i] and records[i].get("key") == key else 1,
                    records[i].get("until", 0) if records[i] else 0))
                offset = (bucket * WAYS + way) * self.record_size
                os.pwrite(fd, data.ljust(self.record_size, b" "), offset)
            finally:
                os.close(fd)

    def _read(self, buckets: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The records of `buckets` that are still within their time."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            for bucket in buckets:
                with self._lock(bucket):
                    records = self._records(fd, bucket)
                now = time.time()
                yield from (r for r in records if r and r.get("until", 0) >= now)
        finally:
            os.close(fd)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The record kept under `key`, if still within its time."""
        return next((r for r in self._read([self._bucket(key)]) if r.get("key") == key), None)

    def live(self) -> list[dict[str, Any]]:
        """Every record still within its time (the whole table is read)."""
        return list(self._read(range(self.buckets)))


class FailureMemory:
    """`explain` turns a build's exception into what a client is told (the app's error handlers'
    translation), which is what is kept: every later client gets the same answer, whatever
    exception type carried it."""

    def __init__(self, directory: Path, lock_dir: Path, ttl: int,
                 explain: Callable[[Exception], RegistryError]):
        self.table = _Table(directory / TABLE_FILE, lock_dir, BUCKETS, RECORD_SIZE)
        self.ttl = ttl
        self.explain = explain

    def remember(self, key: str, error: Exception) -> None:
        """Keeps `error` for the TTL under `key` (a hex digest); errors that would not repeat are ignored."""
        if self.ttl <= 0 or isinstance(error, StorageError) or not isinstance(error, REMEMBERED):
            return
        self.table.put(key, self.ttl, {"error": encode(self.explain(error))})

    def recall(self, key: str) -> Optional[RegistryError]:
        """The error remembered under `key` within its TTL, or None."""
        if self.ttl <= 0:
            return None
        record = self.table.get(key)
        return decode(record["error"]) if record else None


class FailedDerivations:
    """Derivations whose build failed or timed out, each with Nix's line about it, kept for the TTL
    (NIXERY_FAILURE_TTL) under its .drv path: any image whose build needs one fails the same way."""

    def __init__(self, directory: Path, lock_dir: Path, ttl: int):
        self.table = _Table(directory / DERIVATIONS_FILE, lock_dir, DERIVATION_BUCKETS, DERIVATION_RECORD_SIZE)
        self.ttl = ttl

    def remember(self, error: DerivationFailed) -> None:
        if self.ttl > 0:
            self.table.put(_hex(error.derivation), self.ttl,
                           {"derivation": error.derivation, "line": first_error_line(error.log)[:LINE_KEPT],
                            "timed_out": isinstance(error, BuildTimedOut)})

    def recall(self) -> dict[str, DerivationFailed]:
        """Every derivation remembered within the TTL -> its failure, as the build that met it raised it
        (the reason of a BuildFailed is for the caller to word for its image: `nix.as_seen_by`)."""
        if self.ttl <= 0:
            return {}
        failures: dict[str, DerivationFailed] = {}
        for record in self.table.live():
            drv, line = record.get("derivation"), record.get("line")
            if isinstance(drv, str) and isinstance(line, str):
                failures[drv] = (BuildTimedOut(f"building failed: {line}", line, drv) if record.get("timed_out")
                                 else BuildFailed(f"building failed: {line}", line, drv))
        return failures
