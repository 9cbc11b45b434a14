"""The build memo: the manifest digest of each unpinned image built moments ago.

An image without a pinned revision (a path source) is never cached, so requests
that queued behind its build would each build it again once the lock is free;
instead they take the digest its build just stored, if it was made at most
`MEMO_SECONDS` before they arrived. Kept in the state database (nixery/state.py)
for every worker, at most `CAPACITY` entries, the oldest dropped first.
"""

from __future__ import annotations

import time
from typing import Optional

from .config import StateLayout
from .state import Store, bounded_put

# An unpinned image built this recently is served (from the build memo) to requests that
# queued behind the build (a request may wait in a worker's accept queue before its clock starts).
MEMO_SECONDS = 10.0
# Far more builds than can end within MEMO_SECONDS.
CAPACITY = 1024


class BuildMemo:
    def __init__(self, state: StateLayout):
        self.store = Store.at(state.store)

    def recall(self, key: str, since: float) -> Optional[str]:
        """The digest built under `key` at most MEMO_SECONDS before `since`, if any."""
        rows = self.store.query("SELECT digest FROM build_memo WHERE key = ? AND built >= ?",
                                (key, since - MEMO_SECONDS))
        return rows[0][0] if rows else None

    def remember(self, key: str, digest: str) -> None:
        with self.store.write() as connection:
            bounded_put(connection, "build_memo", {"key": key, "digest": digest, "built": time.time()}, CAPACITY)
