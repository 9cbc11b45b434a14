"""The build history: recent builds and build errors, in the state database so that every Gunicorn worker sees them all.

Workers are processes that share nothing in memory, so a list in one of them
would show a user a third of the story. Each finished build is added to a table
of the state database (nixery/state.py), trimmed to the last few in the same
transaction; the web page and `/builds.json` read it. Failures go to a second
table as well, so a burst of good builds cannot push the reason a pull failed
off the list before its user looks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import falcon

from .config import StateLayout
from .state import Store, bounded_put
from .stats import BuildStats

log = logging.getLogger(__name__)

_MESSAGES = {"built": "image built", "cached": "image served from cache",
             "rejected": "image rejected", "failed": "image build failed"}
_BUILD_FIELDS = ("layers", "layers_built", "layers_reused", "bytes_written", "bytes_reused", "size", "steps")


def entry(stats: BuildStats, finished: float) -> dict[str, Any]:
    """One build as the page, `/builds.json` and the log show it."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "image": stats.image,
        "tag": stats.tag,
        "outcome": stats.outcome,
        "duration": stats.duration,
        "layers": stats.layers,
        "layers_built": stats.layers_built,
        "layers_reused": stats.layers_reused,
        "bytes_written": stats.bytes_written,
        "bytes_reused": stats.bytes_reused,
        "size": stats.size,
        "steps": dict(stats.steps),
        "reason": stats.reason,
    }


class BuildHistory:
    """The last `builds_kept` builds, and the last `errors_kept` failures of each outcome (rejected,
    failed), so that a storm of rejected names (a scanner's) cannot push the real build failures
    off the list."""

    def __init__(self, state: StateLayout, builds_kept: int = 50, errors_kept: int = 20):
        self.store = Store.at(state.store)
        self.builds_kept = builds_kept
        self.errors_kept = errors_kept

    def record(self, item: dict[str, Any]) -> None:
        with self.store.write() as connection:
            data = json.dumps(item)
            bounded_put(connection, "builds", {"item": data}, self.builds_kept)
            if item["reason"] is not None:
                connection.execute("INSERT INTO build_errors (outcome, item) VALUES (?, ?)", (item["outcome"], data))
                connection.execute("DELETE FROM build_errors WHERE outcome = ?1 AND id NOT IN "
                                   "(SELECT id FROM build_errors WHERE outcome = ?1 ORDER BY id DESC LIMIT ?2)",
                                   (item["outcome"], self.errors_kept))

    def builds(self) -> list[dict[str, Any]]:
        """Newest first."""
        return self._read("SELECT item FROM builds ORDER BY id DESC")

    def errors(self) -> list[dict[str, Any]]:
        """Newest first."""
        return self._read("SELECT item FROM build_errors ORDER BY id DESC")

    def _read(self, sql: str) -> list[dict[str, Any]]:
        return [json.loads(item) for (item,) in self.store.query(sql)]


def _log_fields(item: dict[str, Any]) -> dict[str, Any]:
    """The summary line's fields: layer counts only where layers were made, a reason only on failure."""
    fields = {k: item[k] for k in ("image", "tag", "outcome", "duration")}
    if item["outcome"] == "built":
        fields.update((k, item[k]) for k in _BUILD_FIELDS)
    if item["reason"] is not None:
        fields["reason"] = item["reason"]
    return fields


class BuildRecorder:
    """Falcon middleware: logs every manifest request that reached the builder, and keeps
    the real builds and failures (not cache hits, which would crowd them out) for the page."""

    def __init__(self, store: BuildHistory):
        self.store = store

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        stats = req.context.get("build")
        if stats is None:
            return
        item = entry(stats, time.time())
        # The log names the client (behind a trusted proxy, the one it names); the page does not.
        log.log(logging.WARNING if stats.outcome == "failed" else logging.INFO,
                _MESSAGES[stats.outcome], extra={**_log_fields(item), "client": req.remote_addr,
                                                 **({"action": stats.action} if stats.action else {})})
        if stats.outcome == "cached":
            return
        try:
            self.store.record(item)
        except OSError as e:  # a StateError too
            # The client already has its answer; a full disk must not turn it into an error.
            log.warning("cannot record the build for the web page", extra={"reason": str(e)})
