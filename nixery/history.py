"""The build history: recent builds and build errors, kept on disk so that every Gunicorn worker sees them all.

Workers are processes that share nothing in memory, so a list in one of them
would show a user a third of the story. Each finished build is appended to a
small JSON-lines file under the state directory (under a file lock, trimmed
to the last few entries, replaced atomically so readers need no lock); the
web page and `/builds.json` read those files. Failures go to a second file as
well, so a burst of good builds cannot push the reason a pull failed off the
list before its user looks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import falcon

from .atomic import write_atomic
from .config import StateLayout
from .locks import file_lock
from .stats import BuildStats

log = logging.getLogger(__name__)

BUILDS_FILE = "builds.jsonl"
ERRORS_FILE = "errors.jsonl"
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
    """The last `builds_kept` builds and `errors_kept` failures, newest last on disk."""

    def __init__(self, state: StateLayout, builds_kept: int = 50, errors_kept: int = 20):
        self.directory = state.history
        self.lock_dir = state.locks
        self.builds_kept = builds_kept
        self.errors_kept = errors_kept

    def record(self, item: dict[str, Any]) -> None:
        with file_lock(self.lock_dir, "recent-builds"):
            self._append(BUILDS_FILE, item, self.builds_kept)
            if item["reason"] is not None:
                self._append(ERRORS_FILE, item, self.errors_kept)

    def builds(self) -> list[dict[str, Any]]:
        """Newest first."""
        return self._read(BUILDS_FILE)[::-1]

    def errors(self) -> list[dict[str, Any]]:
        """Newest first."""
        return self._read(ERRORS_FILE)[::-1]

    def _read(self, name: str) -> list[dict[str, Any]]:
        try:
            text = (self.directory / name).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]

    def _append(self, name: str, item: dict[str, Any], kept: int) -> None:
        """Rewrites the whole (small) file: trimming and appending in one atomic step. The errors
        file keeps `kept` of each outcome, so a storm of rejected names (a scanner's) cannot push
        the real build failures off the list."""
        self.directory.mkdir(parents=True, exist_ok=True)
        items = self._read(name) + [item]
        if name == ERRORS_FILE:
            counts: dict[str, int] = {}
            newest_first = []
            for old in reversed(items):
                counts[old["outcome"]] = counts.get(old["outcome"], 0) + 1
                if counts[old["outcome"]] <= kept:
                    newest_first.append(old)
            items = newest_first[::-1]
        items = items[-kept * (2 if name == ERRORS_FILE else 1):]
        write_atomic(self.directory / name, "".join(json.dumps(i) + "\n" for i in items).encode())


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
                _MESSAGES[stats.outcome], extra={**_log_fields(item), "client": req.remote_addr})
        if stats.outcome == "cached":
            return
        try:
            self.store.record(item)
        except OSError as e:
            # The client already has its answer; a full disk must not turn it into an error.
            log.warning("cannot record the build for the web page", extra={"reason": str(e)})
