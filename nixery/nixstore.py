"""The Nix store's upkeep: GC roots for the images kept in storage, and Nixery's own collection.

A build's outputs are rooted while it runs (`Nix.gc_roots`). Once its manifest is stored,
the image's packages are rooted again, for as long as the image is kept, under
`images/<manifest digest>` in the GC roots folder: named after the manifest's storage key,
so that whoever removes an image from storage (a collection, a lifecycle rule, an
operator) needs to know nothing of roots. While the root is there, `nix-collect-garbage`
(anyone's) leaves the image's closure, and building the image again (a pull that heals a
lost blob, an unpinned image asked for again) builds nothing.

After each storage collection a worker runs (with the keys that collection left in storage),
before each of Nixery's own collections, and at most every `CHECK_SECONDS` after a build, the
roots whose manifest is no longer in storage are dropped, so the next collection of the store
frees their paths. Nixery collects the store itself only past NIXERY_NIX_STORE_LIMIT:
on a store of its own (a container, a pod) that frees everything no root holds; on a
shared store (NixOS) it is left unset and the system's collection frees what Nixery no
longer roots. Either way Nixery only ever removes roots of its own folder.

Roots are indirect (Nix registers a link to the link), so neither the store nor Nixery's
state needs to be writable by the other.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Collection, Optional, Sequence

from .locks import file_lock
from .manifest import SHA256_RE
from .nix import Nix, NixError
from .recent import Recent
from .storage import Backend, StorageError, blob_key

log = logging.getLogger(__name__)

IMAGES = "images"
# How often (at most) a worker drops stale roots and measures the store after its builds.
CHECK_SECONDS = 300


class ImageRoots:
    """The roots of the images kept in storage, one folder per manifest digest."""

    def __init__(self, nix: Nix, lock_dir: Path):
        self.nix = nix
        self.directory = nix.gcroot_dir / IMAGES
        self.lock_dir = lock_dir

    def keep(self, digest: str, outputs: Sequence[str]) -> None:
        """Roots the image whose manifest is `digest`: its packages `outputs` and so their closure
        (called while the build's own roots still hold them, once the manifest is stored)."""
        root = self.directory / digest
        with file_lock(self.lock_dir, f"image root {digest}"):
            if (root / "out").is_symlink():  # the same manifest: the same store paths
                return
            root.mkdir(parents=True, exist_ok=True)
            self.nix.add_roots(root / "out", sorted(set(outputs)))

    def prune(self, storage: Backend, listed: Optional[Collection[str]] = None) -> list[str]:
        """Drops the roots of images whose manifest is no longer in storage; returns their digests.
        Storage is listed once (or `listed`, the keys a storage collection just left, is used):
        on GCS a request per root would cost more than the listing. A manifest the listing lacks
        is looked for once more (stored since it was listed: its root is new). A root being made
        at this moment (its lock held) is left for the next time."""
        roots = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
        if not roots:
            return []
        present = listed if listed is not None else {o.key for o in storage.objects()}
        dropped = []
        for root in roots:
            digest = root.name
            with file_lock(self.lock_dir, f"image root {digest}", wait=False) as free:
                if not free or (SHA256_RE.fullmatch(digest) and (blob_key(digest) in present
                                                                 or storage.stat(blob_key(digest)) is not None)):
                    continue
                shutil.rmtree(root, ignore_errors=True)
                dropped.append(digest)
        return dropped


class StoreCollection:
    """Drops stale image roots and, past `limit` bytes of store (0: never), collects the store's
    garbage; in the background after builds, one worker at a time, each at most every CHECK_SECONDS."""

    def __init__(self, roots: ImageRoots, storage: Backend, limit: int, lock_dir: Path):
        self.roots = roots
        self.storage = storage
        self.limit = limit
        self.lock_dir = lock_dir
        self._checked = Recent(CHECK_SECONDS, kept=1)

    def after_build(self) -> None:
        """Starts a check in the background if this worker's last one is CHECK_SECONDS old."""
        if not self._checked.first("check"):
            return
        threading.Thread(target=self.check, name="nix-store-upkeep", daemon=True).start()

    def check(self, listed: Optional[Collection[str]] = None) -> None:
        """One check, unless another worker is running one; failures are logged (they cost space, not
        pulls). `listed`: what a storage collection left in storage, which spares a listing."""
        with file_lock(self.lock_dir, "nix store collection", wait=False) as mine:
            if not mine:
                return
            try:
                self.collect(listed)
            except (NixError, StorageError, OSError) as e:
                log.warning("nix store upkeep failed", extra={"reason": getattr(e, "reason", str(e))})

    def collect(self, listed: Optional[Collection[str]] = None) -> None:
        dropped = self.roots.prune(self.storage, listed)
        if dropped:
            log.info("dropped the roots of images no longer in storage", extra={"images": len(dropped)})
        if not self.limit:
            return
        size = self.roots.nix.store_size()
        if size <= self.limit:
            return
        start = time.monotonic()
        self.roots.nix.collect_garbage(size - self.limit)
        log.info("nix store collected", extra={"before": size, "after": self.roots.nix.store_size(),
                                               "limit": self.limit, "seconds": round(time.monotonic() - start, 3)})
