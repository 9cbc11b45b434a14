"""From an `Image` to a stored manifest: the one place where the build's steps meet.

name -> source revision -> (nixery/admission.py: cached? remembered failure?
may it build now?) -> Nix evaluation -> Nix build -> layers -> archives (each
written once, found again through its content-keyed record) -> root layer ->
config -> manifest. Each step lives in its own module; this one orders them and
counts what happened (nixery/stats.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import time
from typing import Callable, Mapping, Optional, Protocol, Sequence, TypeVar

from . import archive, declared, layers, manifest, rootfs, uploads
from .admission import Admission
from .config import BuildLimits, StateLayout
from .errors import RegistryError
from .image import OPTIONAL_PACKAGES, Architecture, Image
from .nix import (PROGRESS_RE, Closure, EvaluationFailed, Nix, NixError, RevisionMissing, UnavailablePackages,
                  UnknownPackages, UnsupportedSystem, advice, listening)
from .nix import Resolved as Evaluation
from .nixstore import ImageRoots, StoreCollection
from .parking import Parking
from .progress import InProgress, LineBudget, Tracker
from .search import revision_key
from .sources import Resolved, Source, UnknownTag
from .stats import BuildStats, combined
from .storage import Backend, blob_key
from .suggest import Suggestions

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Result:
    manifest: manifest.Document
    stats: BuildStats


class ManifestBuilder(Protocol):
    """What the HTTP layer asks of a builder (`Builder`; the fast tests' stand-in has no Nix)."""

    def manifest(self, image: Image, media_type: str = manifest.MANIFEST_MEDIA_TYPE, *, may_build: bool = True,
                 client: str = "", parking: Optional[Parking] = None, index_only: bool = False) -> Result:
        """The stored manifest for `image` as `media_type`, or an exception the error handlers know;
        without `may_build` an image not built yet is refused (BuildRefused); `client` (its
        address) is counted against the per-client limit of new builds; with `parking`, a request
        that would wait for another's build raises `Parked` instead; `index_only`: the client
        takes an index (`media_type`) and no single manifest, so it gets one whatever the platforms."""


def in_media_type(storage: Backend, document: manifest.Document, media_type: str) -> manifest.Document:
    """A stored Docker manifest in the form a client takes (a client that takes a multi-platform
    type gets the single-image type it lists). The OCI form is stored too, so that the client can
    fetch it again by the digest it was given."""
    media_type = manifest.ENTRY_MEDIA_TYPES.get(media_type, media_type)
    if media_type != manifest.OCI_MANIFEST_MEDIA_TYPE:
        return document
    oci = manifest.as_oci(document)
    storage.put_if_absent(blob_key(oci.digest), oci.data, oci.media_type)
    return oci


# What `meta.mainProgram` may be: a file name in the package's bin/.
_PROGRAM_RE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,254}")


def default_command(image: Image, closure: Closure, main_program: object) -> manifest.RunConfig:
    """An image of one package runs its `meta.mainProgram` (`docker run HOST/hello` prints the
    greeting), when the package has that program in bin/; `shell` images run bash instead, and an
    image of several packages has no command of its own, as before: which would it run?"""
    out = closure.packages.get(image.packages[0]) if len(image.packages) == 1 and not image.shell else None
    if (out is None or not isinstance(main_program, str) or not _PROGRAM_RE.fullmatch(main_program)
            or not os.path.isfile(os.path.join(out, "bin", main_program))):
        return manifest.RunConfig()
    return manifest.RunConfig(cmd=[main_program])


def _heard(image: str, tracker: Tracker, budget: LineBudget, line: str) -> None:
    """A line Nix wrote while building `image`, in the log at INFO as it happens (Nix's own progress
    lines always, builders' output within `budget`, the rest at DEBUG: the whole of it is logged if
    Nix fails) and on the page as the build's latest line."""
    if not line:
        return
    progress = bool(PROGRESS_RE.match(line))
    if progress or budget.take():
        held = budget.release_held()
        log.info("nix progress" if progress else "nix output",
                 extra={"image": image, "nix": line, **({"lines_not_shown": held} if held else {})})
    else:
        log.debug("nix output", extra={"image": image, "nix": line})
    tracker.note(line)


class Builder:
    """`platforms` are those an image is offered for (NIXERY_PLATFORMS); `systems` are those this
    instance's Nix builds for (None: unknown, nothing refused before Nix runs); `in_progress` shows
    running builds; `suggestions` keeps the set's names; `image_roots` roots what each image built
    needs and `store_collection` keeps the Nix store within its limit (nixery/nixstore.py)."""

    def __init__(self, storage: Backend, nix: Nix, source: Source, popularity: Mapping[str, int],
                 budget: int, state: StateLayout, *, platforms: Sequence[Architecture] = (),
                 nix_snapshotter: bool = False, systems: Optional[Sequence[str]] = None,
                 in_progress: Optional[InProgress] = None, suggestions: Optional[Suggestions] = None,
                 limits: BuildLimits = BuildLimits(),
                 explain: Optional[Callable[[Exception], RegistryError]] = None,
                 image_roots: Optional[ImageRoots] = None, store_collection: Optional[StoreCollection] = None):
        self.storage = storage
        self.nix = nix
        self.source = source
        self.popularity = popularity
        self.budget = budget
        self.platforms = tuple(platforms)
        self.nix_snapshotter = nix_snapshotter
        self.admission = Admission(storage, state, limits,
                                   f"{uploads.RECORD_VERSION}|{manifest.IMAGE_VERSION}|snapshotter={nix_snapshotter}",
                                   systems=systems, requisites=nix.requisites, explain=explain)
        self.in_progress = in_progress or InProgress(state)
        self.suggestions = suggestions or Suggestions()
        self.image_roots = image_roots
        self.store_collection = store_collection

    def manifest(self, image: Image, media_type: str = manifest.MANIFEST_MEDIA_TYPE, *, may_build: bool = True,
                 client: str = "", parking: Optional[Parking] = None, index_only: bool = False) -> Result:
        """The manifest for `image` as `media_type` (Docker schema 2 or its OCI form, or a manifest
        list or OCI index of every platform when the client takes one), built if needed and
        allowed (nixery/admission.py). Raises what the steps raise; the app's error handlers
        tell the client. A client that takes a list or index alone (`index_only`) gets one even
        of a single platform: it could not read the manifest itself."""
        multi = len(self.platforms) > 1 and not image.arch_given
        if not image.arch_given and self.platforms:
            # A name without `arm64/` is for the first platform listed (this machine's, by default).
            image = dataclasses.replace(image, arch=self.platforms[0])
        build = lambda variant: self._docker_manifest(variant, may_build, client, parking)  # noqa: E731
        if media_type in manifest.ENTRY_MEDIA_TYPES and (multi or index_only):
            return self._index(image, media_type, build, self.platforms if multi else (image.arch,))
        result = build(image)
        return Result(in_media_type(self.storage, result.manifest, media_type), result.stats)

    def _index(self, image: Image, media_type: str, build: Callable[[Image], Result],
               platforms: Sequence[Architecture]) -> Result:
        """The index of `image` on `platforms`. Its entries name each platform's
        manifest digest, so every platform not built yet is built now, in parallel; each is
        stored on its own and served again to the next index or single-platform request.
        A platform the package set cannot build for (UnsupportedSystem) is left out, unless
        none is left."""
        variants = [dataclasses.replace(image, arch=arch) for arch in platforms]
        built: list[tuple[Image, Result]] = []
        unsupported: list[UnsupportedSystem] = []
        with concurrent.futures.ThreadPoolExecutor(len(variants), thread_name_prefix="platform") as pool:
            for variant, future in [(variant, pool.submit(build, variant)) for variant in variants]:
                try:
                    built.append((variant, future.result()))
                except UnsupportedSystem as e:
                    log.info("platform left out of the index", extra={"image": image.name, "reason": str(e)})
                    unsupported.append(e)
        if not built:
            raise unsupported[0]
        index = manifest.image_index(media_type, [
            (in_media_type(self.storage, result.manifest, media_type).descriptor(), variant.arch.docker_arch)
            for variant, result in built])
        self.storage.put_if_absent(blob_key(index.digest), index.data, index.media_type)
        return Result(index, combined(image.name, image.tag, [result.stats for _, result in built]))

    def _docker_manifest(self, image: Image, may_build: bool, client: str, parking: Optional[Parking]) -> Result:
        stats = BuildStats(image=image.name, tag=image.tag)
        resolved = self.source.resolve(image.tag)
        document = self.admission.manifest(image, resolved, stats, lambda: self._build(image, resolved, stats),
                                           may_build=may_build, client=client, parking=parking)
        return Result(document, stats)

    def _build(self, image: Image, source: Resolved, stats: BuildStats) -> manifest.Document:
        # Logged and shown while the build runs (a URL's credentials hidden), and the key of the
        # set's names for suggestions, which the search shares: one name for both.
        revision = revision_key(source)
        log.info("build started", extra={"image": image.name, "tag": image.tag, "packages": list(image.packages),
                                         "system": image.arch.nix_system, "revision": revision})
        budget = LineBudget()
        with self.in_progress.build(image.name, image.tag, image.packages, revision) as tracker, \
                listening(lambda line: _heard(image.name, tracker, budget, line)):
            step = lambda name, fn: self._timed(stats, tracker, name, fn)  # noqa: E731
            try:
                with self.nix.gc_roots() as roots:
                    resolved = step("evaluate", lambda: self._resolve(image, source, revision))
                    declaration = (declared.parse(image.declarable, resolved.declared)
                                   if resolved.declared is not None else None)
                    image = declared.contents(image, declaration)
                    closure: Closure = step("build", lambda: self._realise(image, source, roots, resolved))
                    self.admission.check_size(closure)
                    groups = step("layer", lambda: layers.group(
                        closure.paths, list(closure.packages.values()), self.popularity, self.budget))
                    digests = step("upload", lambda: uploads.write_layers(self.storage, closure, groups, stats,
                                                                            image.nonroot))
                    document = self._finish(image, source, closure, groups, digests, stats,
                                            declared.run_config(declaration) if declaration
                                            else default_command(image, closure, resolved.main_program))
                    self._keep(image, document, closure)  # while the build's roots still hold its paths
            except NixError as e:
                # The whole log goes to the server's log only; the client gets `e.reason`. A failure
                # the client is not told about (a 5xx) says what the operator should do.
                todo = advice(e)
                log.error("nix failed", extra={"image": image.name, "reason": e.reason, "nix_log": e.log,
                                               **({"action": todo} if todo else {})})
                raise
        if self.store_collection:
            self.store_collection.after_build()
        return document

    def _keep(self, image: Image, document: manifest.Document, closure: Closure) -> None:
        """Roots the image's packages for as long as its manifest is stored (nixery/nixstore.py); a
        failure costs a rebuild after the store's next collection, not this pull."""
        if self.image_roots is None:
            return
        try:
            self.image_roots.keep(document.digest, list(closure.packages.values()))
        except (NixError, OSError) as e:
            log.warning("cannot root the image's packages", extra={"image": image.name,
                                                                   "reason": getattr(e, "reason", str(e))})

    @staticmethod
    def _timed(stats: BuildStats, tracker: Tracker, step: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        tracker.step(step)
        try:
            return fn()
        finally:
            stats.steps[step] = round(time.monotonic() - start, 3)
            log.info("build step", extra={"image": stats.image, "step": step, "duration": stats.steps[step]})

    def _resolve(self, image: Image, source: Resolved, revision: str) -> Evaluation:
        """The evaluation, with suggestions for unknown names from the set's names (listed once per revision)."""
        pinned = bool(source.cache_key)
        try:
            return self.nix.resolve(image.packages, OPTIONAL_PACKAGES, source.args, image.arch.nix_system,
                                    listed=self.suggestions.listed(revision, pinned), declarable=image.declarable)
        except EvaluationFailed as e:
            if pinned:  # a fixed revision: every retry fails the same way, so the client is told why
                raise EvaluationFailed(e.reason, e.log, pinned=True) from None
            raise
        except RevisionMissing:
            if pinned and source.revision:  # a commit the archive does not have: the tag names nothing
                raise UnknownTag(source.revision, f"tag {source.revision}: no such commit "
                                                  f"({source.source_url} was not found)") from None
            raise
        except (UnknownPackages, UnavailablePackages) as e:
            unknown = e if isinstance(e, UnknownPackages) else e.unknown
            if unknown is not None:
                self.suggestions.learn(revision, pinned, unknown.listed)
                for name in unknown.names:
                    close = self.suggestions.suggest(revision, name, unknown.stopped_in.get(name, ""))
                    if close:
                        unknown.suggestions[name] = close
            raise

    def _realise(self, image: Image, source: Resolved, roots, resolved: Evaluation) -> Closure:
        """The build of what the evaluation found, unless a derivation it needs failed lately."""
        with self.admission.derivations(image, resolved):
            return self.nix.build(image.packages, OPTIONAL_PACKAGES, source.args, image.arch.nix_system, roots,
                                  resolved)

    def _finish(self, image: Image, source: Resolved, closure: Closure, groups: Sequence[layers.Layer],
                digests: Sequence[archive.LayerDigests], stats: BuildStats,
                run: manifest.RunConfig) -> manifest.Document:
        """The image config and the manifest, both stored (blobs already there are not written again)."""
        user = rootfs.NONROOT if image.nonroot else None
        config = manifest.nixery_config(
            image.arch.docker_arch, [d.diff_id for d in digests], [group.paths for group in groups], image.packages,
            shell=image.shell, cert_file=rootfs.CACERT_BUNDLE if "cacert" in closure.packages else "",
            user=manifest.ImageUser(user.uid, user.home) if user else None,
            source_url=source.source_url, revision=source.revision, run=run)
        annotations = [manifest.nix_layer_annotations(group.paths) if self.nix_snapshotter else ()
                       for group in groups] + [()]
        document = manifest.image_manifest(config.descriptor(), [
            manifest.Descriptor(archive.LAYER_MEDIA_TYPE, d.digest, d.size, notes)
            for d, notes in zip(digests, annotations)])
        for blob in (config, document):
            self.storage.put_if_absent(blob_key(blob.digest), blob.data, blob.media_type)
        stats.layers = len(digests)
        return document
