"""Failed builds and unknown names, remembered for a short while per source revision.

A retry storm (CI re-pulling a broken image, a scanner trying names) must not
run Nix again and again: the first failure's answer is kept for
`NIXERY_FAILURE_TTL` seconds under the image's key, which includes the source
revision, so a new commit is built at once. Workers share nothing in memory,
so the answers live on disk, in one fixed-size table file: `BUCKETS` buckets of
`WAYS` records of `RECORD_SIZE` bytes, the bucket chosen by the key's hash. State
stays bounded whatever clients ask for; a new answer takes its key's old record,
else an expired one, else the one expiring first, so thousands of live answers
are kept before any is lost.

Only failures that would repeat are kept: Nix's own failures, unknown
packages, unsupported systems and registry errors. A storage fault is not
the image's fault and is never remembered.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import RegistryError
from .locks import file_lock
from .nix import NixError, UnknownPackages, UnsupportedSystem
from .storage import StorageError

# What would repeat: the package set's answers and Nix's; a storage fault is the instance's, not the image's.
REMEMBERED = (RegistryError, NixError, UnknownPackages, UnsupportedSystem)

TABLE_FILE = "failures"
BUCKETS = 1024
WAYS = 8
RECORD_SIZE = 2048
BUCKET_SIZE = WAYS * RECORD_SIZE


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


class FailureMemory:
    """`explain` turns a build's exception into what a client is told (the app's error handlers'
    translation), which is what is kept: every later client gets the same answer, whatever
    exception type carried it."""

    def __init__(self, directory: Path, lock_dir: Path, ttl: int,
                 explain: Callable[[Exception], RegistryError]):
        self.path = directory / TABLE_FILE
        self.lock_dir = lock_dir
        self.ttl = ttl
        self.explain = explain

    @staticmethod
    def _bucket(key: str) -> int:
        return int(key[:12], 16) % BUCKETS

    def _records(self, fd: int, bucket: int) -> list[Optional[dict[str, Any]]]:
        raw = os.pread(fd, BUCKET_SIZE, bucket * BUCKET_SIZE).ljust(BUCKET_SIZE, b"\0")
        return [_parse(raw[i * RECORD_SIZE:(i + 1) * RECORD_SIZE]) for i in range(WAYS)]

    def remember(self, key: str, error: Exception) -> None:
        """Keeps `error` for the TTL under `key` (a hex digest); errors that would not repeat are ignored."""
        if self.ttl <= 0 or isinstance(error, StorageError) or not isinstance(error, REMEMBERED):
            return
        data = encode(self.explain(error))
        now = time.time()
        record = json.dumps({"key": key, "until": now + self.ttl, "error": data}).encode()
        if len(record) > RECORD_SIZE:
            return  # an answer too long to keep is built again next time
        bucket = self._bucket(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_dir, f"failure-bucket {bucket}"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                records = self._records(fd, bucket)
                # Its own old record, else an empty or expired one, else the one expiring first.
                way = min(range(WAYS), key=lambda i: (
                    0 if records[i] and records[i].get("key") == key else 1,
                    records[i].get("until", 0) if records[i] else 0))
                os.pwrite(fd, record.ljust(RECORD_SIZE, b" "), bucket * BUCKET_SIZE + way * RECORD_SIZE)
            finally:
                os.close(fd)

    def recall(self, key: str) -> Optional[RegistryError]:
        """The error remembered under `key` within its TTL, or None."""
        if self.ttl <= 0:
            return None
        bucket = self._bucket(key)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            with file_lock(self.lock_dir, f"failure-bucket {bucket}"):
                records = self._records(fd, bucket)
        finally:
            os.close(fd)
        now = time.time()
        for record in records:
            if record and record.get("key") == key and record.get("until", 0) >= now:
                return decode(record["error"])
        return None
