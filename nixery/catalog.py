"""The declared images of `latest`, for the page and `/declared.json`.

Reading them costs an evaluation of the set's nixery-images.nix (and, for a git
source, maybe a fetch), so the listing is kept: for a pinned revision as long as
the process runs (a commit's declarations never change), for a directory, which
may change at any time, and after a failure, for `RETRY_SECONDS` (so that a set
whose file never finishes evaluating costs one evaluation per worker that often,
not one per page view). Each worker keeps its own: a listing is a page's
content, and a worker that lists a revision again costs one evaluation, not a
wrong answer.
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

RETRY_SECONDS = 30.0
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
        # Revision (a pinned cache key, or "" for a directory) -> (kept until, listing).
        self.kept: dict[str, tuple[float, Catalog]] = {}

    def latest(self) -> Catalog:
        try:
            resolved = self.source.resolve("latest")
        except SourceError as e:
            return Catalog(None, error=str(e))
        key = resolved.cache_key or ""
        with self.lock:
            until, catalog = self.kept.get(key, (0.0, Catalog(None)))
            if time.monotonic() < until:
                return catalog
        try:
            catalog = Catalog(resolved.revision, tuple(declared.listing(
                self.nix.declared_images(resolved.args, self.system))))
            until = float("inf") if key else time.monotonic() + RETRY_SECONDS
        except NixError as e:
            log.warning("cannot list the declared images", extra={"reason": e.reason, "nix_log": e.log})
            catalog = Catalog(resolved.revision, error=e.reason)
            until = time.monotonic() + RETRY_SECONDS
        with self.lock:
            if len(self.kept) >= PINNED_KEPT:
                self.kept.pop(next(iter(self.kept)))
            self.kept[key] = (until, catalog)
        return catalog
