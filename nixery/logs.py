"""Logs on stderr: one JSON object a line for log collectors, or one plain line for people.

Fields passed with `extra=` (image, step, duration, reason, ...) become
top-level keys, so a build's steps can be followed by grepping one image.
Someone who starts `nixery` in a terminal reads the same lines as text
(NIXERY_LOG_FORMAT=auto): time, level, message, then the fields as key=value.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from .parking import waited

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's `extra=` fields."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`14:02:31 INFO    build started  image=shell/hello tag=latest`: a line to read, not to parse.
    A field of several lines (Nix's whole log) follows, indented."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        inline, blocks = [], []
        for key, value in _fields(record).items():
            if value is None:
                continue
            shown = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
            if "\n" in shown.strip():
                blocks.append(f"  {key}:\n" + "\n".join(f"    {line}" for line in shown.strip().splitlines()))
            else:
                inline.append(f"{key}={shown}")
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if inline:
            line += "  " + " ".join(inline)
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        return "\n".join([line, *blocks])


def formatter(log_format: str) -> logging.Formatter:
    """NIXERY_LOG_FORMAT's formatter: `auto` is text on a terminal (someone is reading), JSON otherwise."""
    text = log_format == "text" or (log_format == "auto" and sys.stderr.isatty())
    return TextFormatter() if text else JsonFormatter()


def setup(level: str, log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
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
    """Falcon middleware (NIXERY_ACCESS_LOG): one line per request on the `nixery.access` logger,
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
