"""Prometheus metrics: what the operator of an instance graphs and alerts on.

Gunicorn runs several worker processes, so the values live in
prometheus_client's multiprocess files (the server makes a fresh directory,
the state layout's `prometheus`, before the workers start, and hands it to
each worker's app) and `/metrics` adds up every worker's files, including
those of workers that have since exited. Without that directory (an app made
in a test or a script) the process's own registry is served instead.

Requests are labelled with the route's template, never the raw path, so that
image names cannot grow the number of series without bound.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import falcon
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)

from . import __version__
from .stats import BuildStats

if TYPE_CHECKING:
    from .collector import Report

BUILD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(req: falcon.Request) -> str:
    """A bounded label for the request's route: its URI template (nixery/routes.py gives the
    registry's path shapes theirs)."""
    return req.uri_template or "{unmatched}"


class Metrics:
    """Every metric Nixery exports, registered in a registry of its own (so an app can be made twice)."""

    def __init__(self, multiprocess_dir: Optional[Path] = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.requests = Counter("nixery_http_requests", "HTTP requests answered, by route template and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.builds = Counter("nixery_builds", "Manifest requests that reached the builder, by outcome: "
                              "built, cached, rejected (4xx) or failed (5xx).", ["outcome"], registry=self.registry)
        self.build_duration = Histogram("nixery_build_duration_seconds",
                                        "Time to answer a manifest request, by outcome.", ["outcome"],
                                        buckets=BUILD_BUCKETS, registry=self.registry)
        self.step_duration = Histogram("nixery_build_step_duration_seconds",
                                       "Time of each build step: evaluate, build, layer, upload.", ["step"],
                                       buckets=BUILD_BUCKETS, registry=self.registry)
        self.layers = Counter("nixery_layers", "Layers of built images: archived and written (built) "
                              "or found already stored (reused).", ["result"], registry=self.registry)
        self.layer_bytes = Counter("nixery_layer_bytes", "Compressed layer bytes written to storage "
                                   "or reused from it.", ["result"], registry=self.registry)
        self.password_checks = Counter("nixery_password_checks", "Passwords checked against the htpasswd file "
                                       "(bcrypt hashes; a login remembered or refused for too many failures "
                                       "costs none).", registry=self.registry)
        self.nix_invocations = Counter("nixery_nix_invocations", "Nix processes started, by command.",
                                       ["command"], registry=self.registry)
        # livesum: the builds of every worker that is alive, added up (a dead worker's stop counting).
        self.in_progress = Gauge("nixery_builds_in_progress", "Builds running now (Nix, layering, upload).",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.heals = Counter("nixery_heals", "Requests that found a blob of their image gone (collected, lost, "
                             "deleted) and built it again, by request: manifest or blob.", ["request"],
                             registry=self.registry)
        # mostrecent: the value the last collection set, whichever worker ran it.
        self.storage_bytes = Gauge("nixery_storage_bytes", "Bytes of blobs, layer records and manifests in storage "
                                   "after the last collection.", registry=self.registry,
                                   multiprocess_mode="mostrecent")
        self.gc_last_run = Gauge("nixery_gc_last_run_timestamp_seconds", "When the last collection of storage "
                                 "finished (Unix time).", registry=self.registry, multiprocess_mode="mostrecent")
        self.gc_duration = Gauge("nixery_gc_duration_seconds", "How long the last collection of storage took.",
                                 registry=self.registry, multiprocess_mode="mostrecent")
        self.gc_removed_bytes = Counter("nixery_gc_removed_bytes", "Bytes the collections removed from storage.",
                                        registry=self.registry)
        self.gc_removed_objects = Counter("nixery_gc_removed_objects", "Objects (blobs, layer records, "
                                          "manifests) the collections removed from storage.", registry=self.registry)
        self.info = Gauge("nixery_build_info", "Always 1; the labels say which Nixery runs and what it serves.",
                          ["version", "source"], registry=self.registry, multiprocess_mode="max")

    def describe(self, source_kind: str) -> None:
        """Sets `nixery_build_info` for this instance."""
        self.info.labels(__version__, source_kind).set(1)

    def count_in_progress(self, change: int) -> None:
        self.in_progress.inc(change)

    def count_heal(self, request: str) -> None:
        self.heals.labels(request).inc()

    def observe_collection(self, report: "Report") -> None:
        self.storage_bytes.set(report.stored_bytes)
        self.gc_last_run.set(report.finished)
        self.gc_duration.set(report.duration)
        self.gc_removed_bytes.inc(report.removed_bytes)
        self.gc_removed_objects.inc(report.removed_objects)

    def count_password_check(self) -> None:
        self.password_checks.inc()

    def count_nix(self, command: str) -> None:
        self.nix_invocations.labels(os.path.basename(command)).inc()

    def observe_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method if method in _METHODS else "OTHER", str(status)).inc()

    def observe_build(self, stats: BuildStats) -> None:
        self.builds.labels(stats.outcome).inc()
        self.build_duration.labels(stats.outcome).observe(stats.duration)
        for step, seconds in stats.steps.items():
            self.step_duration.labels(step).observe(seconds)
        self.layers.labels("built").inc(stats.layers_built)
        self.layers.labels("reused").inc(stats.layers_reused)
        self.layer_bytes.labels("written").inc(stats.bytes_written)
        self.layer_bytes.labels("reused").inc(stats.bytes_reused)
        if stats.healed:
            self.count_heal("manifest")

    def exposition(self) -> bytes:
        """The text format, summed over all workers when running under the server."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)


class MetricsMiddleware:
    """Falcon middleware: counts every request and, for manifest requests, the build behind it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        self.metrics.observe_request(route_of(req), req.method, falcon.http_status_to_code(resp.status))
        stats = req.context.get("build")
        if stats is not None:
            self.metrics.observe_build(stats)


class MetricsResource:
    """`/metrics` in Prometheus' text format."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self.metrics.exposition()
