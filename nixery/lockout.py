"""Failed logins, counted across Gunicorn's workers per client address and per user.

A password check costs a bcrypt hash by design, so guessing is slowed and then
stopped: each failure from an address holds its 401 back longer (doubling, capped),
and after `limit` attempts in a row an address, or a user name, gets 429 without a
check until `pause` seconds pass without one. Workers share nothing in memory, and
counts kept per worker would let N workers check N times as many guesses, so the
counts live in the state database (nixery/state.py), at most `CAPACITY` of them:
past that, the count that moved longest ago goes. Each decision reads and writes
the counts it needs in one transaction.

An attempt is counted when it is admitted, before its password is checked, so
that a burst of concurrent guesses cannot all pass the check of the count before
any of them has failed: at most `limit` checks are made per address and per user.
A login that passes clears its address and takes its attempt back from its user.
The user names counted are those the client sent (hashed): an attacker trying
names locks those names, which is what a lockout per user means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import time
from typing import Callable, Optional

from .config import StateLayout
from .state import Store, bounded_put

# Addresses and users counted at most (a record each).
CAPACITY = 32768
_SELECT = "SELECT count, last FROM logins WHERE key = ?"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What `FailedLogins.admit` decided: `retry_after` seconds to wait (0: admitted, and counted),
    and `delay`, how long to hold back the answer if this attempt fails."""

    retry_after: float
    delay: float = 0.0


def _key(kind: str, value: str) -> bytes:
    return hashlib.sha256(f"{kind}\0{value}".encode(errors="replace")).digest()[:16]


class FailedLogins:
    """The counts live in `state`'s store."""

    def __init__(self, state: StateLayout, *, base_delay: float = 0.05, max_delay: float = 1.0,
                 limit: int = 20, pause: float = 60.0, clock: Callable[[], float] = time.time):
        self.store = Store.at(state.store)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.limit = limit
        self.pause = pause
        self.clock = clock

    @staticmethod
    def _keys(address: str, user: Optional[str]) -> list[bytes]:
        return [_key("address", address)] + ([_key("user", user)] if user is not None else [])

    def _counted(self, row: Optional[tuple[int, float]], now: float) -> tuple[int, float]:
        """(count, last) of a key's row; count 0 for a key not there or whose pause is over."""
        return (row[0], row[1]) if row and now - row[1] < self.pause else (0, now)

    def _read(self, connection: sqlite3.Connection, key: bytes, now: float) -> tuple[int, float]:
        return self._counted(connection.execute(_SELECT, (key,)).fetchone(), now)

    @staticmethod
    def _write(connection: sqlite3.Connection, key: bytes, count: int, last: float) -> None:
        if count:
            bounded_put(connection, "logins", {"key": key, "count": count, "last": last}, CAPACITY)
        else:
            connection.execute("DELETE FROM logins WHERE key = ?", (key,))

    def retry_after(self, address: str) -> float:
        """Seconds before `address` may try again; 0 when it may now (nothing is counted)."""
        now = self.clock()
        count, last = self._counted(next(iter(self.store.query(_SELECT, (_key("address", address),))), None), now)
        return self.pause - (now - last) if count >= self.limit else 0.0

    def admit(self, address: str, user: Optional[str]) -> Attempt:
        """Counts an attempt of `user` (None for a token) from `address` that is about to be checked,
        unless either has `limit` attempts in a row already."""
        keys = self._keys(address, user)
        with self.store.write() as connection:
            now = self.clock()
            found = [self._read(connection, key, now) for key in keys]
            waits = [self.pause - (now - last) for count, last in found if count >= self.limit]
            if waits:
                return Attempt(retry_after=max(waits))
            for key, (count, _) in zip(keys, found):
                self._write(connection, key, count + 1, now)
        address_count = found[0][0] + 1
        return Attempt(0.0, min(self.max_delay, self.base_delay * 2 ** (address_count - 1)))

    def succeeded(self, address: str, user: Optional[str] = None) -> None:
        """A login passed: the address starts again from nothing, and the user's admitted attempt
        (when one was counted) is taken back."""
        keys = self._keys(address, user)
        with self.store.write() as connection:
            now = self.clock()
            for index, key in enumerate(keys):
                count, last = self._read(connection, key, now)
                if count:
                    self._write(connection, key, 0 if index == 0 else count - 1, last)
