"""What pulls leave behind for the collector and the heal: when each image was last pulled, and as
what name and tag.

The last pull is marked on the manifest's object in storage (nixery/storage: a file's modification
time, which the collector's own reads leave alone, or a GCS object's custom time), so that every worker and every instance sharing the storage
sees it, and so does a bucket lifecycle rule. A write per pull would cost a GCS request each, so
each process marks a manifest at most once per quarter of the grace period: a collection keeps
whatever was used within the grace period, so a pull in progress is always covered.

The name and tag a manifest was pulled as are kept in the state database (nixery/state.py), so that
a request for a blob or a manifest (by digest) gone from storage can rebuild the image that held
it (nixery/heal.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional

from .config import StateLayout
from .recent import Recent
from .state import StateError, Store, bounded_put
from .storage import Backend, blob_key

# Images whose name and tag are remembered (the most recently pulled).
CAPACITY = 100_000


class Pulls:
    def __init__(self, storage: Backend, state: StateLayout, grace: float):
        self.storage = storage
        self.store = Store.at(state.store)
        self._marked = Recent(grace / 4)

    def pulled(self, digest: str, name: str = "", tag: str = "", media_type: str = "") -> None:
        """A client was given the manifest `digest` (of `media_type`, as `name`:`tag`, when asked by tag)."""
        if not self._marked.first((digest, name, tag)):
            return
        self.storage.touch(blob_key(digest))
        if name:
            with contextlib.suppress(StateError), self.store.write() as connection:
                bounded_put(connection, "pulled_images", {"key": f"{name}:{tag}", "name": name, "tag": tag,
                                                         "digest": digest, "media_type": media_type}, CAPACITY)

    def tags(self, name: str, most: int = 5) -> list[tuple[str, str, str]]:
        """(tag, manifest digest, its media type) that `name` was pulled as lately, the most recent first."""
        with contextlib.suppress(StateError):
            return [(tag, digest, media_type) for tag, digest, media_type in self.store.query(
                "SELECT tag, digest, media_type FROM pulled_images WHERE name = ? ORDER BY id DESC LIMIT ?",
                (name, most))]
        return []

    def known(self, digest: str) -> Optional[str]:
        """A name:tag the manifest `digest` was pulled as, if this instance remembers one."""
        with contextlib.suppress(StateError):
            rows = self.store.query("SELECT key FROM pulled_images WHERE digest = ? ORDER BY id DESC LIMIT 1",
                                    (digest,))
            return rows[0][0] if rows else None
        return None
