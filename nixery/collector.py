"""The storage collector: keeps the images pulled most recently within the budget, removes the rest.

Layers in Nixery are a cache: any image can be built again, and a pull of one
whose blobs were removed builds them again (nixery/heal.py). So the policy is a
cache's, not a registry's: an *image* (a manifest, with its other forms and
platforms, the index naming them, its SBOM and the pinned-manifest record that
serves it) was last used when any of its manifests was last pulled; images are
kept from the most recently used down until the next would take storage over
NIXERY_STORAGE_LIMIT or is older than NIXERY_STORAGE_MAX_AGE, and the rest are
removed, then every blob and layer record no kept image references.

What is being read or written is never removed: anything used (written, pulled,
reused by a build) within the grace period is kept whatever the budget, and
each deletion is conditional on the object being unchanged and unused since it
was listed (nixery/storage); an image's manifests are all looked at again before
the first goes, so a pull of any of them meanwhile keeps the image whole. Manifests go before their blobs, so a collection
that dies midway leaves blobs nothing references (the next one takes them),
never a manifest without its blobs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable, Iterable, Optional

from . import manifest
from .config import GcConfig, format_size
from .storage import Backend, StoredObject, blob_key

log = logging.getLogger(__name__)

MANIFEST_TYPES = frozenset({manifest.MANIFEST_MEDIA_TYPE, manifest.OCI_MANIFEST_MEDIA_TYPE,
                            manifest.MANIFEST_LIST_MEDIA_TYPE, manifest.OCI_INDEX_MEDIA_TYPE})
# A collection asks whether it still holds the lease at least this often (seconds).
_KEEP_ALIVE_EVERY = 10.0


@dataclasses.dataclass(frozen=True)
class References:
    """What one manifest (or pinned-manifest record) names: `linked` are manifests of the same image
    (its platforms, its subject, its other form), `blobs` its config and layers."""

    linked: tuple[str, ...]
    blobs: tuple[str, ...]


@dataclasses.dataclass
class Image:
    """The manifests of one image (storage keys), the blobs they reference, and its last use."""

    manifests: list[str]
    blobs: set[str]
    used: float

    @property
    def name(self) -> str:
        """The image as a client could name it: the digest of its most recently used manifest."""
        digests = [key.removeprefix("layers/") for key in self.manifests if key.startswith("layers/")]
        return digests[0] if digests else self.manifests[0]


@dataclasses.dataclass
class Plan:
    kept: list[Image]
    dropped: list[Image]
    # Every object that stays; the rest of `listed` goes.
    keep: set[str]
    listed: dict[str, StoredObject]
    stored: int  # bytes in storage when listed

    @property
    def kept_bytes(self) -> int:
        return sum(o.size for key, o in self.listed.items() if key in self.keep)


@dataclasses.dataclass
class Report:
    """What a collection did (or, dry, would do)."""

    dry_run: bool
    kept: list[Image]
    removed: list[Image]
    removed_objects: int = 0
    removed_bytes: int = 0
    stored_bytes: int = 0  # after the collection
    in_use: int = 0  # objects used or rewritten while the collection ran, and so kept
    finished: float = 0.0
    duration: float = 0.0
    complete: bool = True  # False: the lease was lost midway
    # The keys listed that are still in storage after the collection (those it did not remove): the
    # Nix store's upkeep drops the roots of the manifests not among them (nixery/nixstore.py).
    remaining: set[str] = dataclasses.field(default_factory=set)


class Collector:
    """Collections of `storage` under the budget `gc`; remembers what it has parsed (manifests are
    content-addressed, so their references never change) from one collection to the next."""

    def __init__(self, storage: Backend, gc: GcConfig, clock: Callable[[], float] = time.time):
        self.storage = storage
        self.gc = gc
        self.clock = clock
        self._references: dict[tuple[str, str], References] = {}
        self._records: dict[tuple[str, str], Optional[str]] = {}

    def plan(self) -> Plan:
        now = self.clock()
        listed = {o.key: o for o in self.storage.objects()}
        self._forget_unlisted(listed)
        images = self._images(listed)
        recent = now - self.gc.grace
        keep = {key for key, o in listed.items() if o.used >= recent}
        total = sum(listed[key].size for key in keep)
        kept, dropped, full = [], [], False
        for image in sorted(images, key=lambda i: -i.used):
            new = [key for key in (*image.manifests, *image.blobs) if key in listed and key not in keep]
            cost = sum(listed[key].size for key in new)
            fresh = image.used >= recent
            young = not self.gc.max_age or now - image.used <= self.gc.max_age
            full = full or bool(self.gc.storage_limit and total + cost > self.gc.storage_limit)
            if fresh or (young and not full):
                kept.append(image)
                keep.update(new)
                total += cost
            else:
                dropped.append(image)
        plan = Plan(kept, dropped, keep, listed, sum(o.size for o in listed.values()))
        self._keep_records(plan)
        return plan

    def _forget_unlisted(self, listed: dict[str, StoredObject]) -> None:
        """Drops what was parsed of objects gone or rewritten (on GCS a `touch` is a new version too),
        so that the memory of a long-running server holds what storage holds, not all it ever held."""
        current = {(o.key, o.version) for o in listed.values()}
        for cache in (self._references, self._records):
            for stale in cache.keys() - current:
                del cache[stale]

    def _keep_records(self, plan: Plan) -> None:
        """Layer records stay with the blobs they name."""
        plan.keep.update(key for key, o in plan.listed.items()
                         if key.startswith("builds/") and self._record_digest(o) in plan.keep)

    def collect(self, dry_run: bool = False, keep_alive: Callable[[], bool] = lambda: True) -> Report:
        started = self.clock()
        plan = self.plan()
        report = Report(dry_run, plan.kept, plan.dropped)
        if dry_run:
            report.removed_objects = len(plan.listed) - len(plan.keep & plan.listed.keys())
            report.stored_bytes = plan.kept_bytes
            report.removed_bytes = plan.stored - report.stored_bytes
        else:
            report.remaining = set(plan.listed)
            self._remove(plan, report, keep_alive)
        report.finished = self.clock()
        report.duration = round(report.finished - started, 3)
        return report

    def _remove(self, plan: Plan, report: Report, keep_alive: Callable[[], bool]) -> None:
        """Manifests first (pinned records, then the manifest blobs), image by image, oldest first;
        an image one of whose manifests was used meanwhile is kept whole. Then every other object
        no kept image references. Stops, incomplete, if the lease is lost."""
        checked = [self.clock()]

        def alive() -> bool:
            if self.clock() - checked[0] > _KEEP_ALIVE_EVERY:
                report.complete = keep_alive()
                checked[0] = self.clock()
            return report.complete

        removed: list[Image] = []
        for image in reversed(plan.dropped):
            if not alive():
                break
            members = [plan.listed[key] for key in sorted(image.manifests, key=lambda key: not key.startswith("manifests/"))
                       if key in plan.listed]
            # All of them looked at again first: one pulled since the listing keeps the whole image.
            if all(self.storage.unchanged(member) for member in members) and \
                    all([self._delete(member, report) for member in members]):
                removed.append(image)
            else:  # pulled since it was listed
                report.in_use += 1
                plan.keep.update(image.manifests, image.blobs)
                report.kept.append(image)
        report.removed = removed
        self._keep_records(plan)  # those of the images kept after all
        gone = {key for image in removed for key in image.manifests}
        for key, listed in plan.listed.items():
            if key not in plan.keep and key not in gone:
                if not alive():
                    break
                self._delete(listed, report)
        report.stored_bytes = plan.stored - report.removed_bytes

    def _delete(self, listed: StoredObject, report: Report) -> bool:
        if self.storage.delete(listed):
            report.removed_objects += 1
            report.removed_bytes += listed.size
            report.remaining.discard(listed.key)
            return True
        report.in_use += 1
        return False

    def _images(self, listed: dict[str, StoredObject]) -> list[Image]:
        """The manifests in `listed`, grouped into images (a union-find over their links)."""
        manifests = [o for key, o in listed.items()
                     if key.startswith("manifests/") or (key.startswith("layers/") and o.media_type in MANIFEST_TYPES)]
        parent = {o.key: o.key for o in manifests}

        def root(key: str) -> str:
            while parent[key] != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        references = {o.key: self._parse(o) for o in manifests}
        for key, refs in references.items():
            for other in refs.linked:
                if other in parent:
                    parent[root(other)] = root(key)
        images: dict[str, Image] = {}
        for o in sorted(manifests, key=lambda o: -o.used):
            image = images.setdefault(root(o.key), Image([], set(), o.used))
            image.manifests.append(o.key)
            image.blobs.update(references[o.key].blobs)
        for image in images.values():
            image.blobs.difference_update(image.manifests)
        return list(images.values())

    def _parse(self, listed: StoredObject) -> References:
        cache_key = (listed.key, listed.version)
        if cache_key not in self._references:
            data = self.storage.read(listed.key)
            refs = references(data) if data is not None else References((), ())
            if listed.key.startswith("manifests/") and data is not None:
                refs = References((*refs.linked, blob_key(manifest.digest_of(data))), refs.blobs)
            self._references[cache_key] = refs
        return self._references[cache_key]

    def _record_digest(self, listed: StoredObject) -> Optional[str]:
        """The blob key a layer record names."""
        cache_key = (listed.key, listed.version)
        if cache_key not in self._records:
            data = self.storage.read(listed.key)
            try:
                self._records[cache_key] = blob_key(json.loads(data)["digest"]) if data else None
            except (ValueError, KeyError, TypeError):
                self._records[cache_key] = None
        return self._records[cache_key]


def references(data: bytes) -> References:
    """The manifests and blobs a manifest, index or artifact names; a Docker manifest is linked
    to its OCI form (nixery/builder.py stores both; a pull of either uses the image)."""
    try:
        document = json.loads(data)
        linked = [entry["digest"] for entry in document.get("manifests", [])]
        if "subject" in document:
            linked.append(document["subject"]["digest"])
        blobs = [document["config"]["digest"]] if "config" in document else []
        blobs += [layer["digest"] for layer in document.get("layers", [])]
        if document.get("mediaType") == manifest.MANIFEST_MEDIA_TYPE:
            linked.append(manifest.as_oci(manifest.Document(manifest.MANIFEST_MEDIA_TYPE, data)).digest)
        return References(tuple(_keys(linked)), tuple(_keys(blobs)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return References((), ())


def _keys(digests: Iterable[str]) -> Iterable[str]:
    for digest in digests:
        try:
            yield blob_key(digest)
        except ValueError:
            continue


def describe(report: Report, names: Callable[[str], str] = lambda digest: "") -> list[str]:
    """The lines `nixery gc` prints: each image removed and kept (least recently used first), then
    the totals."""
    verb = "would remove" if report.dry_run else "removed"
    lines = []
    for action, images in ((verb, report.removed), ("kept", report.kept)):
        for image in sorted(images, key=lambda i: i.used):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(image.used))
            known = names(image.name)
            lines.append(f"{action} {image.name}{f' ({known})' if known else ''}, last used {when}")
    lines.append(f"{verb} {len(report.removed)} images, {report.removed_objects} objects, "
                 f"{format_size(report.removed_bytes)}; kept {len(report.kept)} images, "
                 f"{format_size(report.stored_bytes)} stored"
                 + (f"; {report.in_use} objects in use kept" if report.in_use else "")
                 + ("" if report.complete else "; stopped early: the lease was lost"))
    return lines
