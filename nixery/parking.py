"""Requests that wait for another request's build without holding a thread.

Many clients asking at once for an image that is not built yet all wait for its
one build. A thread per waiting request would let a burst of pulls for one new
image take every thread of the instance, and cached pulls, blobs and the health
probes would queue behind them. So when the server can park a request (Nixery's
Gunicorn worker says so in the WSGI environ), the builder raises `Parked`
instead of waiting for the image's lock; the worker keeps the connection and
the request's head, with no thread, and a watcher (one per image being waited
for, per worker) wakes it when the lock is released: the request then runs
again, from the start, and finds the image built (or its failure remembered).
Elsewhere (an app in a test, another server) the builder waits as before.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

# The WSGI environ key under which the worker offers to park a request.
ENVIRON_KEY = "nixery.parking"


@dataclasses.dataclass(frozen=True)
class Parking:
    """The server's offer: `arrived` is when the request first came (time.time(); a request run
    again keeps it, so that it takes a build that finished after it came), `replayed` whether
    it was parked before, `stopping` whether it came while the server was stopping (it then
    gets what needs no build: a build started now would not outlive the grace period)."""

    arrived: float
    replayed: bool = False
    stopping: bool = False


class Parked(Exception):
    """The request waits for another's build: run it again once `wait()` returns. `key` names
    what it waits for, so that a worker watches each lock once, whatever the number of waiters."""

    def __init__(self, key: str, wait: Callable[[], None]):
        super().__init__(key)
        self.key = key
        self.wait = wait


def waited(environ: Mapping[str, object]) -> float:
    """Seconds a request run again spent parked before this run (0 for one run the first time),
    so that the durations logged and counted are the client's."""
    offer = environ.get(ENVIRON_KEY)
    return max(0.0, time.time() - offer.arrived) if isinstance(offer, Parking) and offer.replayed else 0.0
