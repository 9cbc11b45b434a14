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

Workers share nothing in memory, so the answers live in the state database
(nixery/state.py), one table for each kind, bounded whatever clients ask for: a new
answer replaces its key's old one, and past `CAPACITY` answers the oldest written
goes, so thousands of live answers are kept before any is lost.

Only failures that would repeat are kept: Nix's own failures, unknown
packages, unsupported systems and registry errors. A storage fault is not
the image's fault and is never remembered.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from .config import StateLayout
from .errors import RegistryError
from .nix import BuildFailed, BuildTimedOut, DerivationFailed, NixError, UnknownPackages, UnsupportedSystem
from .refusals import ImageTooLarge
from .sources import SourceError
from .state import Store, bounded_put
from .storage import StorageError

# What would repeat: the package set's answers and Nix's; a storage fault is the instance's, not the image's.
REMEMBERED = (RegistryError, NixError, UnknownPackages, UnsupportedSystem, ImageTooLarge, SourceError)

# Answers kept at most, and the longest kept (bytes of JSON; a longer one is built again next time).
CAPACITY = 8192
RECORD_SIZE = 2048
# Failed derivations: few at a time, and every new build reads them all, so a small table.
DERIVATION_CAPACITY = 512
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


class _Table:
    """One table of the store: JSON records under a key, each kept `ttl` seconds,
    at most `capacity` of them and none longer than `record_size` bytes."""

    def __init__(self, store: Store, name: str, capacity: int, record_size: int):
        self.store = store
        self.name = name
        self.capacity = capacity
        self.record_size = record_size

    def put(self, key: str, ttl: int, record: dict[str, Any]) -> None:
        data = json.dumps(record, ensure_ascii=False)
        if len(data.encode()) > self.record_size:
            return  # an answer too long to keep is built again next time
        with self.store.write() as connection:
            bounded_put(connection, self.name, {"key": key, "until": time.time() + ttl, "record": data},
                        self.capacity)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The record kept under `key`, if still within its time."""
        rows = self.store.query(f"SELECT record FROM {self.name} WHERE key = ? AND until >= ?", (key, time.time()))
        return json.loads(rows[0][0]) if rows else None

    def live(self) -> list[dict[str, Any]]:
        """Every record still within its time."""
        return [json.loads(record) for (record,) in
                self.store.query(f"SELECT record FROM {self.name} WHERE until >= ?", (time.time(),))]


class FailureMemory:
    """`explain` turns a build's exception into what a client is told (the app's error handlers'
    translation), which is what is kept: every later client gets the same answer, whatever
    exception type carried it."""

    def __init__(self, state: StateLayout, ttl: int, explain: Callable[[Exception], RegistryError]):
        self.table = _Table(Store.at(state.store), "failures", CAPACITY, RECORD_SIZE)
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

    def __init__(self, state: StateLayout, ttl: int):
        self.table = _Table(Store.at(state.store), "failed_derivations", DERIVATION_CAPACITY, DERIVATION_RECORD_SIZE)
        self.ttl = ttl

    def remember(self, error: DerivationFailed) -> None:
        if self.ttl > 0:
            self.table.put(error.derivation, self.ttl,
                           {"derivation": error.derivation, "line": error.line[:LINE_KEPT],
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
