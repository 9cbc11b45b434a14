"""The WSGI application: wires configuration, storage, Nix and sources to the resources."""

from __future__ import annotations

import logging
from pathlib import Path

import falcon

from . import error_handlers, health, popularity, web
from .api import API_VERSION_HEADER, Registry, VersionCheck
from .auth import AuthMiddleware
from .builder import Builder, BuildLimits, ManifestBuilder
from .config import Config, SourceKind
from .metrics import Metrics, MetricsMiddleware, MetricsResource
from .nix import Nix
from .history import BuildHistory, BuildRecorder
from .sources import Source
from .storage import Backend

log = logging.getLogger(__name__)


def make_storage(config: Config) -> Backend:
    if config.storage_backend == "gcs":
        from .storage.gcs import GcsBackend
        return GcsBackend(config.gcs)
    from .storage.filesystem import FilesystemBackend
    return FilesystemBackend(config.storage_path)


def make_source(config: Config) -> Source:
    """The configured source; pygit2 is only imported when a git repository is."""
    if config.source.kind is SourceKind.PATH:
        from .sources.path import PathSource
        return PathSource(config.source.argument)
    if config.source.kind is SourceKind.CHANNEL:
        from .sources.channel import ChannelSource
        return ChannelSource(config.source.argument, config.channel_url_template, config.channel_allow)
    from .sources.git import GitSettings, GitSource
    return GitSource(GitSettings(url=config.source.argument, ttl=config.git_ttl, ssh_key=config.ssh_key,
                                 token=config.git_token, ssh_dir=config.ssh_dir, ssh_agent=config.ssh_agent,
                                 mirrors_dir=config.state.git, lock_dir=config.state.locks))


class _ApiVersion:
    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded) -> None:
        resp.set_header(*API_VERSION_HEADER)


def create_app(config: Config, storage: Backend | None = None, *, builder: ManifestBuilder | None = None,
               metrics_dir: Path | None = None) -> falcon.App:
    """The app. `metrics_dir` is given by the server, whose workers sum their metrics there;
    `builder` by the fast tests, whose stand-in runs no Nix."""
    storage = storage or make_storage(config)
    metrics = Metrics(metrics_dir)
    history = BuildHistory(config.state)
    if builder is None:
        nix = Nix(config.nix_timeout, config.state.gcroots, on_invoke=metrics.count_nix, cache=config.binary_cache)
        builder = Builder(storage, nix, make_source(config), popularity.load(config.popularity_url),
                          config.layer_budget, config.state,
                          BuildLimits(config.max_builds, config.client_builds, config.failure_ttl))
    # Auth last: its process_response runs first, before the build recorders read req.context.build.
    app = falcon.App(middleware=[_ApiVersion(), MetricsMiddleware(metrics), BuildRecorder(history),
                                AuthMiddleware(config.auth)])
    app.req_options.strip_url_path_trailing_slash = True
    error_handlers.register(app)
    app.add_route("/v2", VersionCheck())
    app.add_sink(Registry(builder, storage), prefix="/v2/")
    app.add_route("/metrics", MetricsResource(metrics))
    web.add_routes(app, config, history)
    health.add_routes(app, storage)
    return app
