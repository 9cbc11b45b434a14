"""Collections of storage: one at a time, every NIXERY_GC_INTERVAL in the server, or once from the
command line (`nixery gc [--dry-run]`, nixery/gc_command.py).

Every worker of every instance offers to collect; the storage's lease (nixery/storage: a locked
file next to the objects, or claims in the bucket) lets one collect at a time, and records when the
last collection finished, so that whichever worker takes the lease next does not collect again
before the interval has passed. A collection renews the lease as it goes and stops if it lost it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Callable, Collection, Optional

from .collector import Collector, Report
from .config import GcConfig
from .metrics import Metrics
from .storage import Backend

log = logging.getLogger(__name__)

# How long a lease holds without renewal (seconds); a collection renews it every few seconds.
LEASE_TERM = 120.0
# Workers look whether a collection is due at least this often (seconds).
_LOOK_EVERY = 60.0


def collect_once(storage: Backend, collector: Collector, *, due_after: float = 0.0) -> Optional[Report]:
    """One collection under the lease, or None when another holds it or (with `due_after`) one
    finished less than `due_after` seconds ago."""
    with storage.lease(LEASE_TERM) as lease:
        if lease is None or (due_after and time.time() - lease.previous < due_after):
            return None
        report = collector.collect(keep_alive=lease.renew)
        lease.finish(report.finished)
        return report


class Schedule:
    """A worker's thread that collects when a collection is due; `collected` is given the keys each
    collection it ran left in storage (the Nix store's upkeep then drops the roots of the others)."""

    def __init__(self, storage: Backend, gc: GcConfig, metrics: Metrics,
                 collected: Callable[[Collection[str]], None] = lambda remaining: None):
        self.storage = storage
        self.gc = gc
        self.metrics = metrics
        self.collector = Collector(storage, gc)
        self.collected = collected

    def start(self) -> None:
        threading.Thread(target=self._run, name="gc-schedule", daemon=True).start()

    def _run(self) -> None:
        look = min(float(self.gc.interval), _LOOK_EVERY)
        time.sleep(random.uniform(0, look))  # workers started together do not all look at once
        while True:
            try:
                report = collect_once(self.storage, self.collector, due_after=self.gc.interval)
                if report is not None:
                    self.metrics.observe_collection(report)
                    log.info("storage collected", extra={
                        "removed_images": len(report.removed), "removed_objects": report.removed_objects,
                        "removed_bytes": report.removed_bytes, "kept_images": len(report.kept),
                        "stored_bytes": report.stored_bytes, "in_use": report.in_use,
                        "duration": report.duration, "finished": report.finished, "complete": report.complete,
                        "pid": os.getpid()})
                    self.collected(report.remaining)
            except Exception:  # a failing bucket, a full state disk: the next look tries again
                log.exception("storage collection failed")
            time.sleep(look)
