"""Pulls that heal: an image whose blob is gone (collected, lost, deleted by hand or by a bucket
lifecycle rule) is built again on the next request instead of being answered 404.

Layers are reproducible (the same store paths give the same bytes), so building an image again
writes back the very blobs its manifest names. Two requests notice a gap:

- a manifest request answered from a stored (pinned) manifest checks that the manifest's blobs
  are there (nixery/blobcheck.py; the builder then rebuilds, nixery/admission.py), and a build that finds
  a layer record whose blob is gone archives the layer again (nixery/uploads.py);
- a blob request for a blob that is gone rebuilds the image it was pulled as, when this instance
  remembers one that names the blob (nixery/pulls.py), and a manifest request by digest for a
  manifest that is gone rebuilds the image it was pulled as by tag (`Healer`): "where it can".
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional, Union

from . import blobcheck, image
from .collector import references
from .manifest import Document
from .parking import Parking
from .pulls import Pulls
from .recent import Recent
from .storage import Backend, LocalFile, Redirect, blob_key

if TYPE_CHECKING:
    from .builder import ManifestBuilder

log = logging.getLogger(__name__)

# Images (name, tag, manifest digest) a blob request built again lately: that build put back every
# blob the image has, so a request for a blob still missing is not one that building again heals
# (a client asking for made-up digests under a pulled name costs one such look per image this long).
_rebuilt = Recent(blobcheck.CHECKED_SECONDS)


class Healer:
    """Answers a request for a blob or manifest gone from storage by rebuilding the image that was
    pulled under the request's name (as one of its recent tags) and holds it; `on_heal` counts
    each request healed (by kind: manifest or blob)."""

    def __init__(self, builder: "ManifestBuilder", storage: Backend, pulls: Pulls, max_packages: int,
                 on_heal: Callable[[str], None] = lambda request: None):
        self.builder = builder
        self.storage = storage
        self.pulls = pulls
        self.max_packages = max_packages
        self.on_heal = on_heal

    def manifest(self, name: str, digest: str, *, may_build: bool, client: str,
                 parking: Optional[Parking]) -> Optional[Document]:
        """The manifest `digest`, built again as the tag of `name` that was pulled as it."""
        for tag, pulled, media_type in self.pulls.tags(name):
            if pulled != digest:
                continue
            log.info("manifest gone: building its image again", extra={"image": name, "tag": tag, "digest": digest})
            result = self.builder.manifest(image.parse(name, tag, self.max_packages), media_type, may_build=may_build,
                                           client=client, parking=parking)
            if result.manifest.digest == digest:
                self.on_heal("manifest")
                return result.manifest
        return None

    def blob(self, name: str, digest: str, *, may_build: bool, client: str,
             parking: Optional[Parking]) -> Optional[Union[LocalFile, Redirect]]:
        """How to get the blob `digest`, after building again the image of `name` that holds it."""
        key = blob_key(digest)
        for tag, manifest_digest, _ in self.pulls.tags(name):
            if _rebuilt.fresh((name, tag, manifest_digest)) or not self._names(manifest_digest, key):
                continue
            log.info("blob gone: building its image again", extra={"image": name, "tag": tag, "digest": digest})
            blobcheck.forget()
            self.builder.manifest(image.parse(name, tag, self.max_packages), may_build=may_build, client=client,
                                  parking=parking)
            _rebuilt.add((name, tag, manifest_digest))
            location = self.storage.locate(key)
            if location is not None:
                self.on_heal("blob")
                return location
        return None

    def _names(self, manifest_digest: str, key: str) -> bool:
        """Whether the manifest (or an image of the index) names the blob; True when the manifest is
        gone too (collected with it: only a build tells)."""
        data = self.storage.read(blob_key(manifest_digest))
        if data is None:
            return True
        refs = references(data)
        if key in refs.blobs:
            return True
        for linked in refs.linked:
            child = self.storage.read(linked)
            if child is not None and key in references(child).blobs:
                return True
        return False
