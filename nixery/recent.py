"""A process's short memory of keys seen lately: what saves a request per pull (a manifest marked
used, a manifest's blobs found all there) when the same thing happened moments ago."""

from __future__ import annotations

import collections
import threading
import time
from typing import Hashable


class Recent:
    """Keys added within the last `seconds`, at most `kept` of them (the oldest are forgotten)."""

    def __init__(self, seconds: float, kept: int = 10_000):
        self.seconds = seconds
        self.kept = kept
        self._added: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: Hashable) -> bool:
        with self._lock:
            return self._fresh(key)

    def add(self, key: Hashable) -> None:
        with self._lock:
            self._add(key)

    def _fresh(self, key: Hashable) -> bool:
        added = self._added.get(key)
        return added is not None and time.monotonic() - added < self.seconds

    def _add(self, key: Hashable) -> None:
        self._added[key] = time.monotonic()
        self._added.move_to_end(key)
        while len(self._added) > self.kept:
            self._added.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._added.clear()

    def first(self, key: Hashable) -> bool:
        """True, and `key` added, unless it was added lately (one step: of two threads asking at
        once, one is first)."""
        with self._lock:
            if self._fresh(key):
                return False
            self._add(key)
            return True
