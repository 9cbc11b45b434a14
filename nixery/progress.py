"""Builds in progress: what each running build is doing now, for the page, `/builds.json` and the metrics.

A build can take minutes, and Gunicorn's workers share nothing in memory, so
each build in progress keeps a row in the state database (nixery/state.py),
rewritten at each step and at most twice a second for Nix's output lines,
removed when the build ends. A worker that dies mid-build leaves its row
behind: readers drop rows whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

from .config import StateLayout
from .state import StateError, Store

# Nix's progress lines rewrite the row at most this often.
NOTE_INTERVAL = 0.5
# Builders' output in the log at INFO: at most this many lines a second per build, after a first burst.
LINES_PER_SECOND = 2.0
LINES_BURST = 20


class LineBudget:
    """How many of a build's output lines go to the log at INFO: a token bucket (`burst` lines at
    once, then `rate` a second), so that a build that prints little shows all of it as it runs and
    one that prints a megabyte a second cannot flood the log. `held` counts the lines refused since
    the last one taken (they go to the debug log only)."""

    def __init__(self, rate: float = LINES_PER_SECOND, burst: int = LINES_BURST,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()
        self.held = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            self.held += 1
            return False

    def release_held(self) -> int:
        """The lines held back since the last call (and forgets them)."""
        with self._lock:
            held, self.held = self.held, 0
            return held


class Tracker:
    """One build in progress; `step` and `note` update what readers see."""

    def __init__(self, store: Store, item: dict[str, Any]):
        self.store = store
        self.id = uuid.uuid4().hex
        self.item = item
        self._lock = threading.Lock()
        self._written = 0.0
        self._pending: Optional[threading.Timer] = None
        self.done = False

    def step(self, name: str) -> None:
        with self._lock:
            self.item.update(step=name, step_started=time.time(), detail=None)
        self._write()

    def note(self, line: str) -> None:
        """The latest line of Nix's output ("building '/nix/store/...drv'", or the builder's own); a
        burst of lines is written once per NOTE_INTERVAL, the last of it when the interval is over."""
        with self._lock:
            self.item["detail"] = line[:300]
            wait = NOTE_INTERVAL - (time.monotonic() - self._written)
            if wait > 0:
                if self._pending is None:
                    self._pending = threading.Timer(wait, self._write)
                    self._pending.daemon = True
                    self._pending.start()
                return
        self._write()

    def _write(self) -> None:
        with self._lock:
            self._pending = None
            if self.done:
                return
            self._written = time.monotonic()
            with contextlib.suppress(StateError), self.store.write() as connection:
                # The page is a view: a full disk must not fail the build.
                connection.execute("INSERT OR REPLACE INTO in_progress (id, pid, item) VALUES (?, ?, ?)",
                                   (self.id, os.getpid(), json.dumps(self.item)))

    def finish(self) -> None:
        with self._lock:
            self.done = True
            if self._pending:
                self._pending.cancel()
        with contextlib.suppress(StateError), self.store.write() as connection:
            connection.execute("DELETE FROM in_progress WHERE id = ?", (self.id,))


class InProgress:
    """The builds in progress on this instance (every worker's); `on_change` hears +1 and -1."""

    def __init__(self, state: StateLayout, on_change: Optional[Callable[[int], None]] = None):
        self.store = Store.at(state.store)
        self.on_change = on_change

    @contextlib.contextmanager
    def build(self, image: str, tag: str, packages: Sequence[str], revision: str) -> Iterator[Tracker]:
        now = time.time()
        tracker = Tracker(self.store,
                          {"image": image, "tag": tag, "packages": list(packages), "revision": revision,
                           "started": now, "step": "start", "step_started": now, "detail": None,
                           "pid": os.getpid()})
        tracker._write()
        if self.on_change:
            self.on_change(1)
        try:
            yield tracker
        finally:
            if self.on_change:
                self.on_change(-1)
            tracker.finish()

    def builds(self, now: Optional[float] = None) -> list[dict[str, Any]]:
        """Oldest first, each with its `elapsed` and `step_elapsed` seconds."""
        now = time.time() if now is None else now
        items = []
        for build, pid, data in self.store.query("SELECT id, pid, item FROM in_progress"):
            if not _alive(pid):
                with contextlib.suppress(StateError), self.store.write() as connection:
                    connection.execute("DELETE FROM in_progress WHERE id = ?", (build,))
                continue
            item = json.loads(data)
            item["elapsed"] = round(now - item["started"], 1)
            item["step_elapsed"] = round(now - item["step_started"], 1)
            items.append(item)
        return sorted(items, key=lambda item: item["started"])


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
