"""The one place where exceptions become registry errors, as Falcon error handlers.

Modules below the HTTP layer raise what they know: a `RegistryError` when the
client's request is at fault, a `StorageError` when the backend fails, Nix's
own errors when a build fails. Each type gets a handler here that renders the
distribution spec's JSON error body, so the wording a client sees (and the
build history records) is decided once, and no code path answers with HTML
or a bare status below `/v2/`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import falcon

from .errors import RegistryError, build_failed, manifest_unknown, unavailable
from .nix import NixError, UnknownPackages, UnsupportedSystem
from .storage import StorageError

log = logging.getLogger(__name__)

# Most specific first: `as_registry_error` takes the first type an exception is an instance of.
_TRANSLATIONS: dict[type[Exception], Callable[[Any], RegistryError]] = {
    RegistryError: lambda error: error,
    StorageError: lambda error: unavailable(f"storage failed: {error}"),
    UnknownPackages: lambda error: manifest_unknown(f"unknown packages: {', '.join(error.names)}",
                                                    {"unknown": list(error.names)}),
    UnsupportedSystem: lambda error: manifest_unknown(str(error), {"system": error.system}),
    NixError: lambda error: build_failed(error.reason),
}
_FALCON_CODES = {404: "NOT_FOUND", 405: "UNSUPPORTED"}


def as_registry_error(error: Exception) -> RegistryError:
    """What a client is told about `error`; anything unforeseen is a 500 naming only its type."""
    for kind, translate in _TRANSLATIONS.items():
        if isinstance(error, kind):
            return translate(error)
    if isinstance(error, falcon.HTTPError):
        return RegistryError(error.status_code, _FALCON_CODES.get(error.status_code, "UNKNOWN"),
                             error.title or "error")
    return RegistryError(500, "UNKNOWN", f"internal error: {type(error).__name__}")


def _render(resp: falcon.Response, error: RegistryError) -> None:
    resp.status = falcon.code_to_http_status(error.status)
    resp.content_type = "application/json"
    resp.set_headers(error.headers)
    resp.data = error.body()


def _translated(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    _render(resp, as_registry_error(error))


def _http_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params: Any) -> None:
    """Falcon's own errors (a method a route lacks, a malformed header) in the registry's
    JSON shape under /v2/, as plain text elsewhere."""
    if req.path.startswith("/v2"):
        _render(resp, as_registry_error(error))
        return
    resp.status = error.status
    resp.content_type = "text/plain"
    resp.text = error.title or "error"


def _unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    log.exception("unhandled error", extra={"path": req.path})
    _render(resp, as_registry_error(error))


def register(app: falcon.App) -> None:
    """One handler per exception type; Falcon picks the most specific for each exception."""
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    for kind in _TRANSLATIONS:
        app.add_error_handler(kind, _translated)
