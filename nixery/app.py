"""The WSGI application: wires configuration, storage, Nix and sources to the resources."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import falcon

from . import api, error_handlers, health, image, popularity, web
from .api import API_VERSION_HEADER, VersionCheck
from .auth import AuthMiddleware
from .clients import RealClient, TrustedProxies
from .builder import Builder, ManifestBuilder
from .catalog import DeclaredImages
from .config import Config, SourceKind
from .metrics import Metrics, MetricsMiddleware, MetricsResource
from .nix import EvalBounds, Nix
from .nixstore import ImageRoots, StoreCollection
from .history import BuildHistory, BuildRecorder
from .lockout import FailedLogins
from .logs import AccessLog
from .progress import InProgress
from .gc_schedule import Schedule
from .heal import Healer
from .pulls import Pulls
from .routes import RegistryRouter
from .sources import Source
from .search import PackageSearch
from .storage import Backend

log = logging.getLogger(__name__)


def make_storage(config: Config) -> Backend:
    if config.storage_backend == "gcs":
        from .storage.gcs import GcsBackend
        return GcsBackend(config.gcs, mark_every=config.gc.grace / 4)
    from .storage.filesystem import FilesystemBackend
    return FilesystemBackend(config.storage_path)


def make_source(config: Config) -> Source:
    """The configured source; pygit2 is only imported when a git repository is."""
    if config.source.kind is SourceKind.PATH:
        from .sources.path import PathSource
        return PathSource(config.source.argument)
    if config.source.kind is SourceKind.CHANNEL:
        from .sources.channel import ChannelSource
        return ChannelSource(config.source.argument, config.channel_url_template, config.channel_allow,
                             config.channel_commits)
    from .sources.git import GitSettings, GitSource
    git = config.git
    return GitSource(GitSettings(url=config.source.argument, ttl=git.ttl, ssh_key=git.ssh_key, token=git.token,
                                 ssh_dir=git.ssh_dir, ssh_agent=git.ssh_agent,
                                 mirrors_dir=config.state.git, lock_dir=config.state.locks,
                                 store=config.state.store))


def make_nix(config: Config, on_invoke: Optional[Callable[[str], None]] = None) -> Nix:
    """Nix as the configuration runs it: the builder's, and the start-up check's evaluation."""
    return Nix(config.nix_timeout, config.state.gcroots, on_invoke=on_invoke, cache=config.binary_cache,
               allow_unfree=config.allow_unfree, allowed_uris=config.allowed_uris,
               eval_bounds=EvalBounds(config.limits.eval_memory, config.limits.eval_timeout))


def with_platforms(config: Config, systems: Optional[Sequence[str]] = None) -> Config:
    """`config` with NIXERY_PLATFORMS filled in when unset: the platforms this instance's Nix
    builds (its system and extra-platforms; `systems` when the caller has read them already).
    The server calls it once, before forking workers."""
    if config.platforms:
        return config
    systems = systems or Nix(config.nix_timeout, config.state.gcroots).systems()
    if systems is None:
        log.warning("cannot read Nix's platforms; offering linux/amd64 only")
        systems = (image.AMD64.nix_system,)
    names = {arch: name for name, arch in image.PLATFORMS.items()}
    return dataclasses.replace(config, platforms=tuple(names[arch] for arch in image.platforms_for(systems)))


def make_builder(config: Config, storage: Backend, *, on_nix: Optional[Callable[[str], None]] = None,
                 in_progress: Optional[InProgress] = None,
                 platforms: Optional[Callable[[Sequence[str]], Sequence[str]]] = None,
                 upkeep: bool = False) -> Builder:
    """The builder the server runs, from the configuration alone: `nixery build` and `nixery push`
    make theirs here too, so that they give the images (and digests) a pull gives. `platforms`
    picks, from the configured ones, those the images are made for (all of them by default);
    with `upkeep` (the server's), the packages of the images it stores are rooted and the Nix
    store is kept under NIXERY_NIX_STORE_LIMIT (nixery/nixstore.py)."""
    nix = make_nix(config, on_nix)
    systems = nix.systems()  # read once: the platforms offered and the systems refused before Nix
    names = with_platforms(config, systems).platforms
    roots = ImageRoots(nix, config.state.locks) if upkeep else None
    return Builder(storage, nix, make_source(config), popularity.load(config.popularity_url),
                   config.layer_budget, config.state,
                   platforms=tuple(image.PLATFORMS[name] for name in (platforms(names) if platforms else names)),
                   nix_snapshotter=config.nix_snapshotter, systems=systems, in_progress=in_progress,
                   limits=config.limits, explain=error_handlers.as_registry_error, image_roots=roots,
                   store_collection=StoreCollection(roots, storage, config.nix_store_limit, config.state.locks)
                   if roots else None)


class _ApiVersion:
    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded) -> None:
        resp.set_header(*API_VERSION_HEADER)


def create_app(config: Config, storage: Backend | None = None, *, builder: ManifestBuilder | None = None,
               metrics_dir: Path | None = None, collect: bool = False) -> falcon.App:
    """The app. `metrics_dir` is given by the server, whose workers sum their metrics there, and
    `collect` too (each worker then offers to collect storage every NIXERY_GC_INTERVAL);
    `builder` by the fast tests, whose stand-in runs no Nix."""
    storage = storage or make_storage(config)
    metrics = Metrics(metrics_dir)
    metrics.describe(config.source.kind.value)
    history = BuildHistory(config.state)
    in_progress = InProgress(config.state, on_change=metrics.count_in_progress)
    source = None
    store_collection: Optional[StoreCollection] = None
    declared: Optional[DeclaredImages] = None
    package_search: Optional[PackageSearch] = None
    if builder is None:
        served = make_builder(config, storage, on_nix=metrics.count_nix, in_progress=in_progress, upkeep=True)
        builder, source, store_collection = served, served.source, served.store_collection
        first = served.platforms[0].nix_system if served.platforms else None
        # The search shares the builder's index of the set's names ("did you mean").
        package_search = PackageSearch(served.nix, source, served.suggestions, first)
        if config.source.kind is not SourceKind.CHANNEL:  # the page must not download nixpkgs
            declared = DeclaredImages(served.nix, source, first or image.AMD64.nix_system)
    auth = AuthMiddleware(config.auth, FailedLogins(config.state),
                          on_check=metrics.count_password_check)
    # The real client first: every other middleware reads its address.
    # The access log next: its process_response runs last, once the response is complete.
    router = RegistryRouter()
    app = falcon.App(router=router, middleware=[RealClient(TrustedProxies(config.server.trusted_proxies)),
                                                *([AccessLog()] if config.access_log else []), _ApiVersion(),
                                                MetricsMiddleware(metrics), BuildRecorder(history), auth])
    app.req_options.strip_url_path_trailing_slash = True
    error_handlers.register(app, auth.challenge)
    app.add_route("/v2", VersionCheck())
    pulls = Pulls(storage, config.state, config.gc.grace)
    healer = Healer(builder, storage, pulls, config.limits.max_packages, metrics.count_heal)
    api.add_routes(router, builder, storage, source or make_source(config), config.limits.max_packages, pulls, healer)
    if collect and config.gc.interval:
        # The roots of the images a collection removed go at once, not after this worker's next build.
        Schedule(storage, config.gc, metrics,
                 collected=store_collection.check if store_collection else lambda remaining: None).start()
    app.add_route("/metrics", MetricsResource(metrics))
    web.add_routes(app, config, history, in_progress, declared, package_search)
    health.add_routes(app, storage)
    return app
