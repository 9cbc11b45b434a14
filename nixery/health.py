"""`/healthz` and `/readyz`, for load balancers and Kubernetes probes.

Liveness (`/healthz`) is 200 whenever the process answers at all: a worker
that cannot answer it should be restarted. Readiness (`/readyz`) is 200 only
when this instance can serve a pull: storage answers its start-up check and
Nix's commands are on PATH; otherwise 503 with a JSON reason, so that traffic
goes to other instances meanwhile. The outcome is kept a few seconds, so that
probes from many sources cost one storage request, not one each.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Callable, Optional

import falcon

from .nix import REQUIRED_COMMANDS
from .storage import Backend, StorageError

READY_CACHE_SECONDS = 5.0


class Liveness:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}

    on_head = on_get


class Readiness:
    def __init__(self, storage: Backend, ttl: float = READY_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.storage = storage
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at: Optional[float] = None
        self._reason: Optional[str] = None

    def reason(self) -> Optional[str]:
        """None when ready, else one line saying why not; checked at most once per `ttl`."""
        with self._lock:
            now = self.clock()
            if self._checked_at is None or now - self._checked_at >= self.ttl:
                self._reason = self._check()
                self._checked_at = self.clock()
            return self._reason

    def _check(self) -> Optional[str]:
        missing = [command for command in REQUIRED_COMMANDS if shutil.which(command) is None]
        if missing:
            return f"not on PATH: {', '.join(missing)}"
        try:
            self.storage.check()
        except (StorageError, OSError) as e:
            return f"{self.storage.name} storage failed: {e}"
        return None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        reason = self.reason()
        resp.set_header("Cache-Control", "no-store")
        if reason is None:
            resp.media = {"status": "ready"}
        else:
            resp.status = falcon.HTTP_503
            resp.media = {"status": "unavailable", "reason": reason}

    on_head = on_get


def add_routes(app: falcon.App, storage: Backend) -> None:
    app.add_route("/healthz", Liveness())
    app.add_route("/readyz", Readiness(storage))
