"""The declared images of `latest`, for the page and `/declared.json`.

Reading them costs an evaluation of the set's nixery-images.nix (and, for a git
source, maybe a fetch), so the listing is kept: for a pinned revision as long as
the process runs (a commit's declarations never change), for a directory, which
may change at any time, for `UNPINNED_TTL` seconds. Each worker keeps its own: a
listing is a page's content, and a worker that lists a revision again costs one
evaluation, not a wrong answer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Optional

from . import declared
from .nix import Nix, NixError
from .sources import Source, SourceError

log = logging.getLogger(__name__)

UNPINNED_TTL = 30.0
PINNED_KEPT = 16


@dataclasses.dataclass(frozen=True)
class Catalog:
    """`images` as the set of `revision` declares them, or `error` when they cannot be read now."""

    revision: Optional[str]
    images: tuple[declared.Listed, ...] = ()
    error: str = ""


class DeclaredImages:
    """Lists the declared images of a source's `latest` on `system` (the first platform's)."""

    def __init__(self, nix: Nix, source: Source, system: str):
        self.nix = nix
        self.source = source
        self.system = system
        self.lock = threading.Lock()
        self.pinned: dict[str, Catalog] = {}
        self.unpinned: Optional[tuple[float, Catalog]] = None

    def latest(self) -> Catalog:
        try:
            resolved = self.source.resolve("latest")
        except SourceError as e:
            return Catalog(None, error=str(e))
        key = resolved.cache_key
        with self.lock:
            if key and key in self.pinned:
                return self.pinned[key]
            if not key and self.unpinned and time.monotonic() - self.unpinned[0] < UNPINNED_TTL:
                return self.unpinned[1]
        try:
            catalog = Catalog(resolved.revision, tuple(declared.listing(
                self.nix.declared_images(resolved.args, self.system))))
        except NixError as e:
            log.warning("cannot list the declared images", extra={"reason": e.reason, "nix_log": e.log})
            return Catalog(resolved.revision, error=e.reason)
        with self.lock:
            if key:
                if len(self.pinned) >= PINNED_KEPT:
                    self.pinned.pop(next(iter(self.pinned)))
                self.pinned[key] = catalog
            else:
                self.unpinned = (time.monotonic(), catalog)
        return catalog
