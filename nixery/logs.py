"""Logs as one JSON object a line on stderr, for log collectors.

Fields passed with `extra=` (image, step, duration, reason, ...) become
top-level keys, so a build's steps can be followed by grepping one image.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from .parking import waited

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    sys.unraisablehook = _log_unraisable


def _log_unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    """An exception Python cannot raise (in a destructor, say) as a JSON line, not a bare traceback."""
    logging.getLogger("nixery").warning(
        "exception ignored", extra={"object": repr(unraisable.object)[:200]},
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        if unraisable.exc_value is not None else None)


class AccessLog:
    """Falcon middleware (NIXERY_ACCESS_LOG): one JSON line per request on the `nixery.access` logger,
    at INFO whatever NIXERY_LOG_LEVEL says, after the response is complete."""

    def __init__(self) -> None:
        self.log = logging.getLogger("nixery.access")
        self.log.setLevel(logging.INFO)
        # When the request began, kept per thread rather than on req.context (which carries what
        # other middleware and resources share): Falcon runs a request's middleware in one thread,
        # and a parked request, which leaves without process_response, starts again with process_request.
        self.started = threading.local()

    def process_request(self, req, resp) -> None:
        self.started.at = time.monotonic() - waited(req.env)

    def process_response(self, req, resp, resource, req_succeeded: bool) -> None:
        started, self.started.at = getattr(self.started, "at", None), None
        length = resp.content_length
        if length is None and resp.stream is None:
            body = resp.render_body()  # rendered once: Falcon keeps what it rendered
            length = len(body) if body is not None else 0
        self.log.info("request", extra={
            "method": req.method,
            "path": req.env.get("PATH_INFO") or req.path,  # as sent: req.path lost its trailing slash
            "query": req.query_string or None,
            "status": resp.status_code,
            "bytes": length,
            "duration": round(time.monotonic() - started, 4) if started is not None else None,
            "client": req.remote_addr,
            "user_agent": req.user_agent,
        })
