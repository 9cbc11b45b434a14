"""The package search: which names this instance's package set offers (`/packages.json?q=`, and the
search box on the page).

A new user's first question is which names exist, and a package set can only
answer it by being evaluated. The names are those of the set's top level at
its `latest` revision, listed by one evaluation (the helper's `attributes`)
and kept in the index the suggestions keep (nixery/suggest.py), per revision,
so a search runs Nix at most once per revision and worker (an unpinned
source's names are listed again after a few minutes), and a pull that failed
on an unknown name has filled it already. A nested set (`python3Packages`) is
found by its own name; what is in it is pulled with a dot.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

from .config import redact_url
from .nix import Nix, NixError
from .sources import Resolved, Source
from .suggest import Suggestions

# The longest query taken (attribute names are short; anything longer is not a search).
QUERY_MAX = 100
RESULTS_MAX = 100
# How long a revision that failed to list is answered with that failure (each query would
# otherwise run Nix again: a set that does not evaluate must not cost an evaluation per query).
FAILED_SECONDS = 30.0


class QueryError(ValueError):
    """A query that is not a search (too long); the message says why."""


@dataclasses.dataclass(frozen=True)
class Found:
    query: str
    names: list[str]
    total: int  # how many matched; `names` holds the first RESULTS_MAX


def revision_key(resolved: Resolved) -> str:
    """A revision's name in the index: its cache key, else what Nix imports (credentials hidden)."""
    return resolved.cache_key or redact_url(f"{resolved.args.kind}:{resolved.args.argument}")


class PackageSearch:
    """Searches the `latest` revision of `source` for names, evaluating it with `nix` for `system`."""

    def __init__(self, nix: Nix, source: Source, suggestions: Suggestions, system: Optional[str]):
        self.nix = nix
        self.source = source
        self.suggestions = suggestions
        self.system = system
        self._listing = threading.Lock()  # one evaluation at a time: the others wait for its names
        self._failed: Optional[tuple[str, float, NixError]] = None  # revision, until, why

    def search(self, query: str, limit: int = RESULTS_MAX) -> Found:
        """Raises QueryError for a query too long, and what the source and Nix raise when the
        set cannot be read (the error handlers know them)."""
        query = query.strip()
        if len(query) > QUERY_MAX:
            raise QueryError(f"the query is longer than {QUERY_MAX} characters")
        resolved = self.source.resolve("latest")
        revision, pinned = revision_key(resolved), bool(resolved.cache_key)
        index = self.suggestions.index(revision, pinned)
        if index is None:
            with self._listing:
                index = self.suggestions.index(revision, pinned)
                if index is None:
                    names = self._names(revision, resolved)
                    self.suggestions.learn(revision, pinned, {"": names})
                    index = self.suggestions.index(revision, pinned)
        names, total = index.search(query, limit) if index else ([], 0)
        return Found(query, names, total)

    def _names(self, revision: str, resolved: Resolved) -> list[str]:
        """The top-level names of `revision` from Nix, or its failure again within FAILED_SECONDS."""
        if self._failed and self._failed[0] == revision and time.monotonic() < self._failed[1]:
            raise self._failed[2].with_traceback(None)  # not a traceback that grows with each query
        try:
            return self.nix.attribute_names(resolved.args, self.system)[""]
        except NixError as e:
            self._failed = (revision, time.monotonic() + FAILED_SECONDS, e)
            raise
