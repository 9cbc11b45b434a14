"""The WSGI application: wires configuration, storage, Nix and sources to the resources."""

from __future__ import annotations

import logging

import falcon

from . import health, popularity, web
from .api import API_VERSION_HEADER, Registry, VersionCheck
from .auth import AuthMiddleware
from .builder import Builder
from .config import Config
from .errors import RegistryError
from .metrics import Metrics, MetricsMiddleware, MetricsResource
from .nix import Nix
from .recent import BuildRecorder, RecentBuilds
from .sources import make_source
from .storage import Backend

log = logging.getLogger(__name__)


def make_storage(config: Config) -> Backend:
    if config.storage_backend == "gcs":
        from .storage.gcs import GcsBackend
        return GcsBackend(config.gcs)
    from .storage.filesystem import FilesystemBackend
    return FilesystemBackend(config.storage_path)


def _registry_error(req: falcon.Request, resp: falcon.Response, error: RegistryError, params) -> None:
    resp.status = falcon.code_to_http_status(error.status)
    resp.content_type = "application/json"
    resp.set_headers(error.headers)
    resp.data = error.body()


def _http_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params) -> None:
    """Falcon's own errors (a method a route lacks, a malformed header) in the registry's
    JSON shape under /v2/, as plain text elsewhere."""
    if not req.path.startswith("/v2"):
        resp.status = error.status
        resp.content_type = "text/plain"
        resp.text = error.title or "error"
        return
    code = {404: "NOT_FOUND", 405: "UNSUPPORTED"}.get(error.status_code, "UNKNOWN")
    _registry_error(req, resp, RegistryError(error.status_code, code, error.title or "error"), params)


def _unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params) -> None:
    log.exception("unhandled error", extra={"path": req.path})
    _registry_error(req, resp, RegistryError(500, "UNKNOWN", f"internal error: {type(error).__name__}"), params)


class _ApiVersion:
    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded) -> None:
        resp.set_header(*API_VERSION_HEADER)


def create_app(config: Config, storage: Backend | None = None) -> falcon.App:
    storage = storage or make_storage(config)
    metrics = Metrics()
    recent = RecentBuilds(config.state_dir)
    nix = Nix(config.nix_timeout, config.gcroot_dir, on_invoke=metrics.count_nix, cache=config.binary_cache)
    builder = Builder(storage, nix, make_source(config), popularity.load(config.popularity_url),
                      config.layer_budget, config.state_dir)
    # Auth last: its process_response runs first, before the build recorders read req.context.build.
    app = falcon.App(middleware=[_ApiVersion(), MetricsMiddleware(metrics), BuildRecorder(recent),
                                AuthMiddleware(config.auth)])
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(RegistryError, _registry_error)
    app.add_route("/v2", VersionCheck())
    app.add_sink(Registry(builder, storage), prefix="/v2/")
    app.add_route("/metrics", MetricsResource(metrics))
    web.add_routes(app, config, recent)
    health.add_routes(app, storage)
    return app
