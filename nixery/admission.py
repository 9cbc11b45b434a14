"""Whether and how a request builds: everything the builder decides before, around and
instead of running Nix.

A pinned image is served from its stored manifest; an unpinned one just built is
served from the build memo to those who queued behind its build. Otherwise the
request takes the image's lock (or, with `parking`, is parked while another
holds it), finds again what the holder did, and only then builds, if the
client may build (`may_build`, decided by the auth layer), if it has not its
share of new builds running, and when one of the instance's build slots is
free. Failures are remembered, as are failed derivations, so that a retry
storm does not run Nix again. Refusals are domain exceptions
(nixery/refusals.py, nix.UnsupportedSystem); the HTTP layer words them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import time
from typing import Callable, Iterator, Optional, Sequence

from .config import BuildLimits, StateLayout
from .errors import RegistryError
from .failures import FailedDerivations, FailureMemory
from .blobcheck import BlobCheck
from .image import Image
from .locks import Slots, file_lock, wait_until_free
from .memo import BuildMemo
from .manifest import MANIFEST_MEDIA_TYPE, Document
from .nix import Closure, DerivationFailed, UnsupportedSystem, as_seen_by
from .nix import Resolved as Evaluation
from .parking import Parked, Parking
from .refusals import BuildRefused, ImageTooLarge, ServerStopping, TooManyBuilds
from .sources import Resolved
from .stats import BuildStats
from .storage import Backend, blob_key

log = logging.getLogger(__name__)

# What a client refused a new build is told to wait before trying again.
RETRY_AFTER_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class Keys:
    """`cache`: the stored manifest's key (pinned images only); `flight`: the image's lock and
    memo; `failure`: its remembered failure (per revision where there is one, else per request)."""

    cache: Optional[str]
    flight: str

    @property
    def failure(self) -> str:
        return self.cache or self.flight


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Admission:
    """`output` names whatever else shapes the stored bytes (the builder's record and image
    versions, its options), so that a change of it is a new cache key; `systems` are those this
    instance's Nix builds for (None: unknown); `requisites` lists the derivations a build needs."""

    def __init__(self, storage: Backend, state: StateLayout, limits: BuildLimits, output: str, *,
                 systems: Optional[Sequence[str]] = None,
                 requisites: Callable[[Sequence[str]], set[str]] = lambda derivations: set(),
                 explain: Optional[Callable[[Exception], RegistryError]] = None):
        self.storage = storage
        self.lock_dir = state.locks
        self.memo = BuildMemo(state)
        self.limits = limits
        self.output = output
        self.systems = systems
        self.requisites = requisites
        # Failures are kept as what a client was told (`explain`: the app's error handlers' translation).
        self.failures = FailureMemory(state, limits.failure_ttl,
                                      explain or (lambda error: RegistryError(500, "UNKNOWN", str(error))))
        self.failed_derivations = FailedDerivations(state, limits.failure_ttl)
        self.build_slots = Slots(state.locks, "build", limits.max_builds)
        self.blob_check = BlobCheck(storage)

    def keys(self, image: Image, resolved: Resolved) -> Keys:
        """Once the revision is fixed the tag no longer matters: `latest` and `release-v2`
        resolving to one commit share a manifest."""
        cache = _hex(f"{self.output}|{resolved.cache_key}|{image.arch.nix_system}|{','.join(image.packages)}|"
                     f"{image.nonroot}|{image.declarable}") if resolved.cache_key else None
        return Keys(cache, cache or _hex(f"{resolved.args.kind}|{resolved.args.argument}|{image.key}"))

    def manifest(self, image: Image, resolved: Resolved, stats: BuildStats, build: Callable[[], Document], *,
                 may_build: bool = True, client: str = "", parking: Optional[Parking] = None) -> Document:
        """The image's manifest: stored, just built by another request, or what `build` makes.
        A cached image never prepares the source (no git export)."""
        keys = self.keys(image, resolved)
        if keys.cache and (cached := self._cached(keys.cache, stats)):
            return cached
        self._check_system(image)
        self._raise_remembered(keys.failure)
        waited_since = parking.arrived if parking else time.time()
        if parking and parking.replayed and not keys.cache and (memo := self._memo(keys.flight, waited_since, stats)):
            return memo  # woken by the end of the build it waited for: no lock to queue on
        with file_lock(self.lock_dir, keys.flight, wait=parking is None) as held:
            if not held:
                raise Parked(f"{self.lock_dir}\0{keys.flight}",
                             functools.partial(wait_until_free, self.lock_dir, keys.flight))
            # Whoever held the lock may have built this image, or failed to, while we waited:
            # everyone who waited gets that one build's answer.
            if keys.cache and (cached := self._cached(keys.cache, stats)):
                return cached
            if not keys.cache and (memo := self._memo(keys.flight, waited_since, stats)):
                return memo
            self._raise_remembered(keys.failure)
            # Building again an image whose blobs are gone heals it: a client that may pull but not
            # build gets it back as it was (stats.healed).
            if not may_build and not stats.healed:
                raise BuildRefused(image.name)
            if parking and parking.stopping:
                raise ServerStopping(RETRY_AFTER_SECONDS)
            document = self._limited(build, keys.failure, client, parking)
            if keys.cache:
                self.storage.write(f"manifests/{keys.cache}", document.data, document.media_type)
            else:
                self.memo.remember(keys.flight, document.digest)
            return document

    def _limited(self, build: Callable[[], Document], failure_key: str, client: str,
                 parking: Optional[Parking]) -> Document:
        """A build within the limits: refused when `client` already has its share of new builds
        running, else run when one of the instance's build slots is free (with `parking`, a request
        that finds none is parked until one is, letting go of the image's lock meanwhile); its
        failure is remembered."""
        with Slots(self.lock_dir, f"client {client}", self.limits.client_builds).hold(wait=False) as allowed:
            if not allowed:
                raise TooManyBuilds(self.limits.client_builds, RETRY_AFTER_SECONDS)
            with self.build_slots.hold(wait=parking is None) as slot:
                if not slot:
                    raise Parked(f"{self.lock_dir}\0build slots", self.build_slots.wait_free)
                try:
                    return build()
                except Exception as e:
                    self.failures.remember(failure_key, e)
                    raise

    def _raise_remembered(self, failure_key: str) -> None:
        error = self.failures.recall(failure_key)
        if error is not None:
            raise error

    def _check_system(self, image: Image) -> None:
        """Refuses at once, without starting Nix, a system this instance's Nix cannot build for."""
        system = image.arch.nix_system
        if self.systems is not None and system not in self.systems:
            raise UnsupportedSystem(f"this instance cannot build for {system}: its Nix builds for "
                                    f"{', '.join(sorted(self.systems))} (no builder or extra-platforms "
                                    f"entry for {system})", system)

    def _cached(self, cache_key: str, stats: BuildStats) -> Optional[Document]:
        """The stored manifest, unless a blob it names is gone (then it is built again: nixery/heal.py)."""
        data = self.storage.read(f"manifests/{cache_key}")
        if data is None:
            return None
        document = Document(MANIFEST_MEDIA_TYPE, data)
        gone = self.blob_check.missing(document)
        if gone:
            log.warning("stored manifest names blobs that are gone: building it again",
                        extra={"image": stats.image, "digest": document.digest, "gone": gone[:5]})
            stats.healed = True
            return None
        stats.cached = True
        return document

    def _memo(self, flight_key: str, since: float, stats: BuildStats) -> Optional[Document]:
        """The image built under `flight_key` moments ago (the build memo), if still in storage."""
        digest = self.memo.recall(flight_key, since)
        data = self.storage.read(blob_key(digest)) if digest else None
        if data is None:
            return None
        stats.cached = True
        return Document(MANIFEST_MEDIA_TYPE, data)

    @contextlib.contextmanager
    def derivations(self, image: Image, resolved: Evaluation) -> Iterator[None]:
        """Around the build of what the evaluation found: refuses it when it needs a derivation
        that failed or timed out within NIXERY_FAILURE_TTL (whatever image asked for it then),
        and remembers a derivation that fails now.

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
                yield
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
        needed = (set(wanted) & failed.keys()) or (self.requisites(wanted) & failed.keys())
        if needed:
            error = failed[min(needed)]
            log.info("build needs a failed derivation", extra={"image": image.name, "derivation": error.derivation})
            raise as_seen_by(error, resolved)

    def check_size(self, closure: Closure) -> None:
        """Refuses an image whose packages take more than NIXERY_MAX_IMAGE_SIZE, before any layer
        is archived (the packages are built by now: their size is only known from the store)."""
        limit = self.limits.max_image_size
        size = sum(path.nar_size for path in closure.paths.values())
        if limit and size > limit:
            raise ImageTooLarge(size, limit)
