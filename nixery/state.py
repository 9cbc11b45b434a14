"""The one store of state shared by Gunicorn's workers: a SQLite database in WAL mode.

Workers are processes that share nothing in memory, so what one learns (a failed
build, a failed login, a finished build, a build's progress, a git fetch) must be
on disk for the others. SQLite (the standard library's `sqlite3`) gives them
transactions across processes and threads with readers that never wait for a
writer (WAL); a worker killed mid-transaction leaves nothing half-written, since
its uncommitted pages are never part of the database and the kernel drops its locks.

Each thread of each process opens its own connection on first use (a connection
must not cross a fork or be shared between threads); a writer waits up to
`BUSY_TIMEOUT` for another. Commits are not flushed to disk one by one
(`synchronous=NORMAL`): a power cut may lose the last moments, which is all
this holds anyway: caches and recent history. The same argument makes a
database of another schema version (or none) start empty rather than migrate.

Every table is bounded: `bounded_put` keeps only the newest `cap` rows (each
write takes a new row id, so the oldest ids are the least recently written).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

# Bump when a table changes: the database then starts empty (everything in it is a cache or recent history).
SCHEMA_VERSION = 2
# How long a writer waits for another before its write fails (seconds).
BUSY_TIMEOUT = 10.0
# The write-ahead log is cut back to this size after each checkpoint.
WAL_SIZE_LIMIT = 4 << 20

SCHEMA = """
CREATE TABLE failures (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, until REAL NOT NULL,
                       record TEXT NOT NULL);
CREATE TABLE failed_derivations (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, until REAL NOT NULL,
                                 record TEXT NOT NULL);
CREATE TABLE logins (id INTEGER PRIMARY KEY, key BLOB UNIQUE NOT NULL, count INTEGER NOT NULL,
                     last REAL NOT NULL);
CREATE TABLE builds (id INTEGER PRIMARY KEY, item TEXT NOT NULL);
CREATE TABLE build_errors (id INTEGER PRIMARY KEY, outcome TEXT NOT NULL, item TEXT NOT NULL);
CREATE INDEX build_errors_by_outcome ON build_errors (outcome, id);
CREATE TABLE in_progress (id TEXT PRIMARY KEY, pid INTEGER NOT NULL, item TEXT NOT NULL);
CREATE TABLE build_memo (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, digest TEXT NOT NULL,
                         built REAL NOT NULL);
CREATE TABLE pulled_images (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
                            tag TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL);
CREATE INDEX pulled_images_by_name ON pulled_images (name, id);
CREATE INDEX pulled_images_by_digest ON pulled_images (digest);
CREATE TABLE git_fetches (source TEXT PRIMARY KEY, ended REAL NOT NULL, error TEXT);
"""

# What versions before this database kept in files under NIXERY_STATE_DIR (the build memo was a
# file per unpinned image built, never removed): removed at start-up (`drop_obsolete`).
OBSOLETE_FOLDERS = ("build-memo", "memory", "history")

# Connections a forked child inherited: kept open, never used.
_INHERITED: list[sqlite3.Connection] = []


class StateError(OSError):
    """The store could not be read or written (a full disk, a writer holding it past BUSY_TIMEOUT):
    an OSError, as a failing state file was, so callers that shrug off a full disk still do."""


class Store:
    """The database at `path`; use `Store.at(path)`, which gives every user in a process the same
    instance, so that a thread holds one connection however many modules keep state."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    @staticmethod
    @functools.lru_cache(maxsize=16)  # one in production; the tests' many folders are let go
    def at(path: Path) -> "Store":
        return Store(path)

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            if hasattr(local, "connection"):
                # A fork's child opens its own, and never closes its parent's: closing it here
                # could let SQLite think the parent's WAL unused.
                _INHERITED.append(local.connection)
            local.connection = self._open()
            local.pid = os.getpid()
        return local.connection

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + BUSY_TIMEOUT
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            while True:
                try:
                    self._prepare(connection)
                    return connection
                except sqlite3.OperationalError as e:
                    # Turning WAL on is not retried by SQLite's busy handler: workers opening a new
                    # database at the same moment take turns here (SQLITE_BUSY's message; its code
                    # is an attribute from Python 3.11 on).
                    if str(e) != "database is locked" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        except sqlite3.Error as e:
            raise StateError(f"cannot open the state database {self.path}: {e}") from e

    def _prepare(self, connection: sqlite3.Connection) -> None:
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._start_afresh(connection)

    @staticmethod
    def _start_afresh(connection: sqlite3.Connection) -> None:
        """Empties a database of another version (or a new one) and makes this version's tables,
        once: the first worker to get the write lock does it, the others find it done."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                for (name,) in tables:
                    connection.execute(f'DROP TABLE "{name}"')
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read (a snapshot: no writer is waited for)."""
        try:
            return self._connection().execute(sql, parameters).fetchall()
        except sqlite3.Error as e:
            raise StateError(f"cannot read the state database {self.path}: {e}") from e

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE: what it reads stays true until
        it commits), committed when the block ends, rolled back if it raises."""
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StateError(f"cannot write the state database {self.path}: {e}") from e
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException as e:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StateError(f"cannot write the state database {self.path}: {e}") from e
            raise


def bounded_put(connection: sqlite3.Connection, table: str, row: dict[str, Any], cap: int) -> None:
    """Writes `row` (replacing the row of the same unique key) as the newest of `table`, and drops
    the rows older than the newest `cap`: the table never holds more than `cap` rows."""
    columns = ", ".join(row)
    placeholders = ", ".join("?" for _ in row)
    cursor = connection.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({placeholders})",
                                tuple(row.values()))
    connection.execute(f"DELETE FROM {table} WHERE id <= ?", (cursor.lastrowid - cap,))


def drop_obsolete(state_dir: Path) -> None:
    """Removes the folders of OBSOLETE_FOLDERS an earlier version left in `state_dir`."""
    for name in OBSOLETE_FOLDERS:
        shutil.rmtree(state_dir / name, ignore_errors=True)
