"""From an `Image` to a stored manifest: the one place where the steps meet.

name -> source revision -> (cached manifest?) -> Nix build -> layers ->
archives (each written once, found again through its content-keyed record)
-> root layer -> config -> manifest. Each step lives in its own module; this
one only orders them, holds the per-image lock, and counts what happened.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Callable, Mapping, Optional, Protocol, Sequence

from . import archive, layers, manifest, rootfs
from .config import StateLayout, format_size, redact_url
from .image import OPTIONAL_PACKAGES, Architecture, Image
from .errors import RegistryError
from .failures import FailedDerivations, FailureMemory
from .locks import Slots, file_lock, wait_until_free
from .memo import BuildMemo
from .nix import (PROGRESS_RE, BuildFailed, Closure, DerivationFailed, Nix, NixError, UnavailablePackages,
                  UnknownPackages, UnsupportedSystem, as_seen_by, listening)
from .nix import Resolved as Evaluation
from .parking import Parked, Parking
from .progress import InProgress, Tracker
from .sources import Resolved, Source
from .suggest import Suggestions
from .storage import Backend, blob_key

log = logging.getLogger(__name__)

# Bump when the bytes a record describes would change (tar layout, compression).
RECORD_VERSION = "nixery-layer-v1"
# A package's build failed: a 4xx, since it will fail again, but a failed build all the same.
BUILD_FAILED_STATUS = 422
# What a client refused a new build is told to wait before trying again.
RETRY_AFTER_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class BuildLimits:
    """How many builds run at once (`max_builds`, all clients; `client_builds`, one client address),
    how long a failure is answered from memory (`failure_ttl` seconds) and the most bytes of
    packages an image may hold (`max_image_size`; 0: no limit)."""

    max_builds: int = 1
    client_builds: int = 1
    failure_ttl: int = 0
    max_image_size: int = 0


# Bump when the same closure would give another config or manifest (users, labels, history),
# so that cached manifests of pinned images are built again.
IMAGE_VERSION = "nixery-image-v2"
PACKAGES_LABEL = "dev.nixery.packages"
SOURCE_LABEL = "org.opencontainers.image.source"
REVISION_LABEL = "org.opencontainers.image.revision"
ROOT_LAYER_HISTORY = ("nixery root layer: /bin, /etc, /lib, ... as symlinks into the packages; "
                      "/etc/passwd, /etc/group, /tmp")


@dataclasses.dataclass
class BuildStats:
    """What one manifest request did; the metrics and the recent-builds page read it."""

    image: str
    tag: str = "latest"
    cached: bool = False
    layers: int = 0
    layers_built: int = 0
    layers_reused: int = 0
    bytes_written: int = 0
    bytes_reused: int = 0
    steps: dict[str, float] = dataclasses.field(default_factory=dict)
    # Filled in by the API when the request is over: its length and, if it failed, what the client was told.
    duration: float = 0.0
    reason: Optional[str] = None
    status: int = 200

    @property
    def outcome(self) -> str:
        """built, cached, rejected (the request's fault: 4xx) or failed (a build that failed, 422,
        or the server's fault, 5xx)."""
        if self.reason is None:
            return "cached" if self.cached else "built"
        return "rejected" if self.status < 500 and self.status != BUILD_FAILED_STATUS else "failed"

    @property
    def size(self) -> int:
        """Compressed bytes of the image's layers (every layer of a build is either written or reused)."""
        return self.bytes_written + self.bytes_reused


@dataclasses.dataclass(frozen=True)
class Result:
    manifest: manifest.Document
    stats: BuildStats


class ManifestBuilder(Protocol):
    """What the HTTP layer asks of a builder (`Builder`; the fast tests' stand-in has no Nix)."""

    def manifest(self, image: Image, media_type: str = manifest.MANIFEST_MEDIA_TYPE,
                 authorise_build: Optional[Callable[[], None]] = None, client: str = "",
                 parking: Optional[Parking] = None) -> Result:
        """The stored manifest for `image` as `media_type`, or an exception the error handlers know;
        `authorise_build` is called before Nix would run, and raises to refuse the client;
        `client` (its address) is counted against the per-client limit of new builds; with
        `parking`, a request that would wait for another's build raises `Parked` instead."""


def in_media_type(storage: Backend, document: manifest.Document, media_type: str) -> manifest.Document:
    """A stored Docker manifest in the form a client takes (a client that takes a multi-platform
    type gets the single-image type it lists). The OCI form is stored too, so that the client can
    fetch it again by the digest it was given."""
    media_type = manifest.ENTRY_MEDIA_TYPES.get(media_type, media_type)
    if media_type != manifest.OCI_MANIFEST_MEDIA_TYPE:
        return document
    oci = manifest.as_oci(document)
    if storage.stat(blob_key(oci.digest)) is None:
        storage.write(blob_key(oci.digest), oci.data, oci.media_type)
    return oci


def _combined(image: Image, parts: Sequence[BuildStats]) -> BuildStats:
    """One request's stats from those of the platforms it built: cached only if all were."""
    stats = BuildStats(image=image.name, tag=image.tag, cached=all(p.cached for p in parts))
    for part in parts:
        stats.layers += part.layers
        stats.layers_built += part.layers_built
        stats.layers_reused += part.layers_reused
        stats.bytes_written += part.bytes_written
        stats.bytes_reused += part.bytes_reused
        for step, seconds in part.steps.items():
            stats.steps[step] = max(stats.steps.get(step, 0.0), seconds)
    return stats


def _heard(image: str, tracker: Tracker, line: str) -> None:
    """A line Nix wrote while building `image`: its progress goes to the log and the page as it
    happens, builders' own output only to the debug log (the whole of it is logged if Nix fails)."""
    if PROGRESS_RE.match(line):
        log.info("nix progress", extra={"image": image, "nix": line})
        tracker.note(line)
    elif line:
        log.debug("nix output", extra={"image": image, "nix": line})


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Builder:
    """`platforms` are those an image is offered for (NIXERY_PLATFORMS); `systems` are those this instance's Nix builds for (None: unknown, nothing refused before
    Nix runs); `in_progress` shows running builds; `suggestions` keeps the set's names."""

    def __init__(self, storage: Backend, nix: Nix, source: Source, popularity: Mapping[str, int],
                 budget: int, state: StateLayout, *, platforms: Sequence[Architecture] = (),
                 nix_snapshotter: bool = False, systems: Optional[Sequence[str]] = None,
                 in_progress: Optional[InProgress] = None, suggestions: Optional[Suggestions] = None,
                 limits: BuildLimits = BuildLimits(),
                 explain: Optional[Callable[[Exception], RegistryError]] = None):
        self.storage = storage
        self.nix = nix
        self.source = source
        self.popularity = popularity
        self.budget = budget
        self.lock_dir = state.locks
        self.memo = BuildMemo(state)
        # The platforms a name without `arm64/` is offered for, as an index (NIXERY_PLATFORMS).
        self.platforms = tuple(platforms)
        self.nix_snapshotter = nix_snapshotter
        self.systems = systems
        self.limits = limits
        # Failures are kept as what a client was told (`explain`: the app's error handlers' translation).
        self.failures = FailureMemory(state, limits.failure_ttl,
                                      explain or (lambda error: RegistryError(500, "UNKNOWN", str(error))))
        self.failed_derivations = FailedDerivations(state, limits.failure_ttl)
        self.build_slots = Slots(state.locks, "build", limits.max_builds)
        self.in_progress = in_progress or InProgress(state)
        self.suggestions = suggestions or Suggestions()

    def manifest(self, image: Image, media_type: str = manifest.MANIFEST_MEDIA_TYPE,
                 authorise_build: Optional[Callable[[], None]] = None, client: str = "",
                 parking: Optional[Parking] = None) -> Result:
        """The manifest for `image` as `media_type` (Docker schema 2 or its OCI form, or a manifest
        list or OCI index of every platform when the client takes one), built if needed.

        `authorise_build` is called when Nix would have to run (nothing cached or just built
        serves the request); it raises to refuse a client that may only pull what is built.
        `client` (its address) is counted against the per-client limit of new builds.
        With `parking` (nixery/parking.py), a request that would wait for the build another
        request is running raises `Parked` instead of holding its thread.
        Raises what the steps raise (RegistryError, StorageError, NixError, UnknownPackages);
        the app's error handlers tell the client."""
        if not image.arch_given and self.platforms:
            # A name without `arm64/` is for the first platform listed (this machine's, by default).
            image = dataclasses.replace(image, arch=self.platforms[0])
        if media_type in manifest.ENTRY_MEDIA_TYPES and len(self.platforms) > 1 and not image.arch_given:
            return self._index(image, media_type, authorise_build, client, parking)
        result = self._docker_manifest(image, authorise_build, client, parking)
        return Result(in_media_type(self.storage, result.manifest, media_type), result.stats)

    def _index(self, image: Image, media_type: str, authorise_build: Optional[Callable[[], None]],
               client: str, parking: Optional[Parking]) -> Result:
        """The index of `image` on every configured platform. Its entries name each platform's
        manifest digest, so every platform not built yet is built now, in parallel; each is
        stored on its own and served again to the next index or single-platform request.
        A platform the package set cannot build for (UnsupportedSystem) is left out, unless
        none is left."""
        variants = [dataclasses.replace(image, arch=arch) for arch in self.platforms]
        outcomes: list[Optional[Result]] = []
        unsupported: list[UnsupportedSystem] = []
        with concurrent.futures.ThreadPoolExecutor(len(variants), thread_name_prefix="platform") as pool:
            futures = [pool.submit(self._docker_manifest, variant, authorise_build, client, parking)
                       for variant in variants]
            for future in futures:
                try:
                    outcomes.append(future.result())
                except UnsupportedSystem as e:
                    log.info("platform left out of the index", extra={"image": image.name, "reason": str(e)})
                    unsupported.append(e)
                    outcomes.append(None)
        built = [(variant, result) for variant, result in zip(variants, outcomes) if result is not None]
        if not built:
            raise unsupported[0]
        entries = [(in_media_type(self.storage, result.manifest, media_type).descriptor(), variant.arch.docker_arch)
                   for variant, result in built]
        index = manifest.image_index(media_type, entries)
        if self.storage.stat(blob_key(index.digest)) is None:
            self.storage.write(blob_key(index.digest), index.data, index.media_type)
        return Result(index, _combined(image, [result.stats for _, result in built]))

    def _docker_manifest(self, image: Image, authorise_build: Optional[Callable[[], None]],
                         client: str, parking: Optional[Parking] = None) -> Result:
        stats = BuildStats(image=image.name, tag=image.tag)
        resolved = self.source.resolve(image.tag)
        # Once the revision is fixed the tag no longer matters: `latest` and `release-v2` resolving
        # to one commit share a manifest. A cached image never prepares the source (no git export).
        cache_key = _hex(f"{RECORD_VERSION}|{IMAGE_VERSION}|{resolved.cache_key}|{image.arch.nix_system}|"
                         f"{','.join(image.packages)}|{image.nonroot}|{self.nix_snapshotter}") \
            if resolved.cache_key else None
        flight_key = cache_key or _hex(f"{resolved.args.kind}|{resolved.args.argument}|{image.key}")
        # Failures are remembered per revision where there is one, else per request (path sources).
        failure_key = cache_key or flight_key
        if cache_key and (cached := self._cached(cache_key, stats)):
            return Result(cached, stats)
        self._check_system(image)
        self._raise_remembered(failure_key)
        waited_since = parking.arrived if parking else time.time()
        if parking and parking.replayed and not cache_key and (memo := self._memo(flight_key, waited_since, stats)):
            return Result(memo, stats)  # woken by the end of the build it waited for: no lock to queue on
        with file_lock(self.lock_dir, flight_key, wait=parking is None) as held:
            if not held:
                raise Parked(f"{self.lock_dir}\0{flight_key}", functools.partial(wait_until_free, self.lock_dir,
                                                                                 flight_key))
            # Whoever held the lock may have built this image, or failed to, while we waited:
            # everyone who waited gets that one build's answer.
            if cache_key and (cached := self._cached(cache_key, stats)):
                return Result(cached, stats)
            if not cache_key and (memo := self._memo(flight_key, waited_since, stats)):
                return Result(memo, stats)
            self._raise_remembered(failure_key)
            if authorise_build:
                authorise_build()
            # Logged and shown while the build runs: a URL's credentials are hidden.
            revision = resolved.cache_key or redact_url(f"{resolved.args.kind}:{resolved.args.argument}")
            document = self._limited_build(image, resolved, stats, revision, cache_key is not None, client,
                                           failure_key, parking)
            if cache_key:
                self.storage.write(f"manifests/{cache_key}", document.data, document.media_type)
            else:
                self.memo.remember(flight_key, document.digest)
            return Result(document, stats)

    def _raise_remembered(self, failure_key: str) -> None:
        error = self.failures.recall(failure_key)
        if error is not None:
            raise error

    def _limited_build(self, image: Image, resolved: Resolved, stats: BuildStats, revision: str, pinned: bool,
                       client: str, failure_key: str, parking: Optional[Parking]) -> manifest.Document:
        """A build within the limits: refused (429) when `client` already has its share of new builds
        running, else run when one of the instance's build slots is free (with `parking`, a request
        that finds none is parked until one is, letting go of the image's lock meanwhile); its
        failure is remembered."""
        client_slots = Slots(self.lock_dir, f"client {client}", self.limits.client_builds)
        with client_slots.hold(wait=False) as allowed:
            if not allowed:
                error = RegistryError(429, "TOOMANYREQUESTS",
                                      f"this address already has {self.limits.client_builds} new builds running; "
                                      "retry when one has finished", {"client_builds": self.limits.client_builds})
                error.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
                raise error
            with self.build_slots.hold(wait=parking is None) as slot:
                if not slot:
                    raise Parked(f"{self.lock_dir}\0build slots", self.build_slots.wait_free)
                try:
                    return self._build(image, resolved, stats, revision, pinned)
                except Exception as e:
                    self.failures.remember(failure_key, e)
                    raise

    def _check_system(self, image: Image) -> None:
        """Refuses at once, without starting Nix, a system this instance's Nix cannot build for."""
        system = image.arch.nix_system
        if self.systems is not None and system not in self.systems:
            raise UnsupportedSystem(f"this instance cannot build for {system}: its Nix builds for "
                                    f"{', '.join(sorted(self.systems))} (no builder or extra-platforms "
                                    f"entry for {system})", system)

    def _cached(self, cache_key: str, stats: BuildStats) -> Optional[manifest.Document]:
        data = self.storage.read(f"manifests/{cache_key}")
        if data is None:
            return None
        stats.cached = True
        return manifest.Document(manifest.MANIFEST_MEDIA_TYPE, data)

    def _memo(self, flight_key: str, since: float, stats: BuildStats) -> Optional[manifest.Document]:
        """The image built under `flight_key` moments ago (the build memo), if still in storage."""
        digest = self.memo.recall(flight_key, since)
        data = self.storage.read(blob_key(digest)) if digest else None
        if data is None:
            return None
        stats.cached = True
        return manifest.Document(manifest.MANIFEST_MEDIA_TYPE, data)

    def _timed(self, stats: BuildStats, step: str, fn: Callable[[], object],
               tracker: Optional[Tracker] = None) -> object:
        start = time.monotonic()
        if tracker:
            tracker.step(step)
        try:
            return fn()
        finally:
            stats.steps[step] = round(time.monotonic() - start, 3)
            log.info("build step", extra={"image": stats.image, "step": step,
                                           "duration": stats.steps[step]})

    def _build(self, image: Image, resolved_source: Resolved, stats: BuildStats, revision: str,
               pinned: bool) -> manifest.Document:
        source_args = resolved_source.args
        log.info("build started", extra={"image": image.name, "tag": image.tag, "packages": list(image.packages),
                                         "system": image.arch.nix_system, "revision": revision})
        with self.in_progress.build(image.name, image.tag, image.packages, revision) as tracker, \
                listening(lambda line: _heard(image.name, tracker, line)):
            try:
                with self.nix.gc_roots() as roots:
                    resolved = self._timed(stats, "evaluate", lambda: self._resolve(
                        image, source_args, revision, pinned), tracker)
                    closure: Closure = self._timed(stats, "build", lambda: self._realise(
                        image, source_args, roots, resolved), tracker)
                    self._refuse_oversized(closure)
                    groups = self._timed(stats, "layer", lambda: layers.group(
                        closure.paths, list(closure.packages.values()), self.popularity, self.budget), tracker)
                    descriptors = self._timed(stats, "upload", lambda: self._write_layers(
                        closure, groups, stats, image.nonroot), tracker)
            except NixError as e:
                # The whole log goes to the server's log only; the client gets `e.reason`.
                log.error("nix failed", extra={"image": image.name, "reason": e.reason, "nix_log": e.log})
                raise
        return self._finish(image, resolved_source, closure, groups, descriptors, stats)

    def _realise(self, image: Image, source_args, roots, resolved: Evaluation) -> Closure:
        """The build of what the evaluation found, unless it needs a derivation that failed or
        timed out within NIXERY_FAILURE_TTL (whatever image asked for it then): that failure is the
        answer, without building. A derivation that fails now is remembered.

        Images asked for at once that share a requested package not built yet take turns (a lock
        per such derivation, in one order): the next one finds it built, or its failure remembered,
        instead of building it again after Nix's own lock on it is released."""
        unbuilt = sorted({resolved.derivations[name].split("!")[0] for name in image.packages
                          if name in resolved.derivations and not os.path.exists(resolved[name])}
                         if self.limits.failure_ttl > 0 else ())
        with contextlib.ExitStack() as held:
            for derivation in unbuilt:
                held.enter_context(file_lock(self.lock_dir, f"derivation {derivation}"))
            self._refuse_failed_derivations(image, resolved)
            try:
                return self.nix.build(image.packages, OPTIONAL_PACKAGES, source_args, image.arch.nix_system, roots,
                                      resolved)
            except DerivationFailed as e:
                self.failed_derivations.remember(e)
                raise

    def _refuse_failed_derivations(self, image: Image, resolved: Evaluation) -> None:
        """Raises the remembered failure of a derivation the image's build needs, if any."""
        failed = self.failed_derivations.recall()
        if not failed:
            return
        wanted = sorted({drv.split("!")[0] for drv in resolved.derivations.values()})
        # The requested packages' own derivations first: no Nix call when one of them failed.
        needed = (set(wanted) & failed.keys()) or (self.nix.requisites(wanted) & failed.keys())
        if needed:
            error = failed[min(needed)]
            log.info("build needs a failed derivation", extra={"image": image.name, "derivation": error.derivation})
            raise as_seen_by(error, resolved) if isinstance(error, BuildFailed) else error

    def _refuse_oversized(self, closure: Closure) -> None:
        """Refuses an image whose packages take more than NIXERY_MAX_IMAGE_SIZE, before any layer
        is archived (the packages are built by now: their size is only known from the store)."""
        limit = self.limits.max_image_size
        size = sum(path.nar_size for path in closure.paths.values())
        if limit and size > limit:
            raise RegistryError(403, "DENIED", f"the image's packages take {format_size(size)} ({size} bytes), "
                                f"more than this instance's limit of {format_size(limit)} (NIXERY_MAX_IMAGE_SIZE)",
                                {"size": size, "max_image_size": limit})

    def _resolve(self, image: Image, source_args, revision: str, pinned: bool):
        """The evaluation, with suggestions for unknown names from the set's names (listed once per revision)."""
        try:
            return self.nix.resolve(image.packages, OPTIONAL_PACKAGES, source_args, image.arch.nix_system,
                                    listed=self.suggestions.listed(revision, pinned))
        except (UnknownPackages, UnavailablePackages) as e:
            unknown = e if isinstance(e, UnknownPackages) else e.unknown
            if unknown is not None:
                self.suggestions.learn(revision, pinned, unknown.listed)
                for name in unknown.names:
                    close = self.suggestions.suggest(revision, name, unknown.stopped_in.get(name, ""))
                    if close:
                        unknown.suggestions[name] = close
            raise

    def _finish(self, image: Image, resolved_source: Resolved, closure: Closure, groups: Sequence[layers.Layer],
                descriptors: Sequence[archive.LayerDigests], stats: BuildStats) -> manifest.Document:
        """The image config (users, labels, a history entry per layer naming its store paths) and
        the manifest, both stored."""
        env = [f"PATH={manifest.DEFAULT_PATH}"]
        if "cacert" in closure.packages:
            env.append(f"SSL_CERT_FILE={rootfs.CACERT_BUNDLE}")
        user = rootfs.NONROOT if image.nonroot else None
        if user:
            env.append(f"HOME={user.home}")
        labels = {PACKAGES_LABEL: ",".join(image.packages)}
        if resolved_source.source_url:
            labels[SOURCE_LABEL] = resolved_source.source_url
        if resolved_source.revision:
            labels[REVISION_LABEL] = resolved_source.revision
        config = manifest.image_config(
            image.arch.docker_arch, [d.diff_id for d in descriptors], env, ["bash"] if image.shell else [],
            history=[" ".join(group.paths) for group in groups] + [ROOT_LAYER_HISTORY], labels=labels,
            user=f"{user.uid}:{user.uid}" if user else "", workdir=user.home if user else "")
        self._store_blob(config)
        annotations = [manifest.nix_layer_annotations(group.paths) if self.nix_snapshotter else ()
                       for group in groups] + [()]
        document = manifest.image_manifest(
            config.descriptor(),
            [manifest.Descriptor(archive.LAYER_MEDIA_TYPE, d.digest, d.size, notes)
             for d, notes in zip(descriptors, annotations)])
        self._store_blob(document)
        stats.layers = len(descriptors)
        return document

    def _store_blob(self, document: manifest.Document) -> None:
        """Content-addressed: a blob already stored is not written again (so an image rebuilt
        on full or read-only storage is still served when all its blobs are there)."""
        if self.storage.stat(blob_key(document.digest)) is None:
            self.storage.write(blob_key(document.digest), document.data, document.media_type)

    def _write_layers(self, closure: Closure, groups: Sequence[layers.Layer],
                      stats: BuildStats, nonroot: bool = False) -> list[archive.LayerDigests]:
        """Every layer's record, the root layer last. Layers are independent, so they are
        archived on as many threads as there are cores (reading, isa-l and hashlib release
        the GIL), largest first so that no big layer starts last; each thread counts into
        its own stats, added up here. The first layer that fails fails the build at once:
        the layers not yet started are dropped (in a storage outage each would wait out
        its own retries before failing the same way)."""
        entries = rootfs.root_entries(closure.packages, nonroot)
        jobs = [(f"paths\n{chr(10).join(group.paths)}",
                 lambda out, paths=group.paths: archive.write_layer(out, store_paths=paths)) for group in groups]
        jobs.append((f"root\n{json.dumps([dataclasses.astuple(e) for e in entries])}",
                     lambda out: archive.write_layer(out, entries=entries)))
        sizes = [group.size for group in groups] + [0]
        parts = [BuildStats(image=stats.image) for _ in jobs]
        with concurrent.futures.ThreadPoolExecutor(archive.THREADS, thread_name_prefix="layer") as pool:
            futures = {i: pool.submit(self._layer, jobs[i][0], parts[i], jobs[i][1])
                       for i in sorted(range(len(jobs)), key=lambda i: -sizes[i])}
            done, _ = concurrent.futures.wait(futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                pool.shutdown(cancel_futures=True)
                raise failed.exception()
            records = [futures[i].result() for i in range(len(jobs))]
        for part in parts:
            stats.layers_built += part.layers_built
            stats.layers_reused += part.layers_reused
            stats.bytes_written += part.bytes_written
            stats.bytes_reused += part.bytes_reused
        return records

    def _layer(self, content: str, stats: BuildStats,
               write: Callable[..., archive.LayerDigests]) -> archive.LayerDigests:
        """A layer's record, archiving it only when no valid record exists for the same content."""
        record_key = f"builds/{_hex(RECORD_VERSION + chr(10) + content)}"
        raw = self.storage.read(record_key)
        if raw is not None:
            record = archive.LayerDigests(**json.loads(raw))
            if self.storage.stat(blob_key(record.digest)) is not None:
                stats.layers_reused += 1
                stats.bytes_reused += record.size
                return record
        with self.storage.upload() as upload:
            digests = write(upload.file)
            upload.commit(blob_key(digests.digest), archive.LAYER_MEDIA_TYPE)
        self.storage.write(record_key, json.dumps(dataclasses.asdict(digests)).encode(), "application/json")
        stats.layers_built += 1
        stats.bytes_written += digests.size
        return digests
