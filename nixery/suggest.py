"""Suggestions ("did you mean"): close attribute names for a name the package set lacks.

The names of a set come from the evaluation that found a name missing (the
helper lists the sets lookups stopped in, nested ones too), once per source
revision: the index is kept per revision and set, and the next evaluation is
told which sets it need not list again. Matching is cheap per request:
rapidfuzz's `ratio` (difflib's measure, in C++) over the lower-cased names,
as the helper's own lookup ignores case; difflib itself took 100 ms and more
per name on 20,000 names that look alike (bench/suggest.py).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional, Sequence

from rapidfuzz import fuzz, process

SUGGESTIONS_MAX = 3
# How alike two names must be (difflib's ratio) to be offered, and how much less alike than the
# closest one the others may be ("gti" is 0.67 like "git"; "hellp" 0.8 like "hello", 0.62 like "oldHello").
CUTOFF = 0.6
MARGIN = 0.1
# Revisions whose names one worker keeps; an unpinned source's names are listed again after this long.
REVISIONS_KEPT = 4
UNPINNED_TTL = 300.0


class NameIndex:
    """The attribute names of one set, ready for close matches."""

    def __init__(self, names: Sequence[str]):
        self.names = sorted(set(names))
        self.lowered = [name.lower() for name in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def search(self, query: str, limit: int) -> tuple[list[str], int]:
        """Up to `limit` names containing `query` (ignoring case): the name itself, then those
        starting with it, then the rest, shorter first; close names after them ("helo" finds
        hello). With them, how many names matched in all."""
        word = query.lower()
        if not word:
            return self.names[:limit], len(self.names)
        ranked = sorted((0 if lowered == word else 1 if lowered.startswith(word) else 2, len(name), name)
                        for name, lowered in zip(self.names, self.lowered) if word in lowered)
        found = [name for _, _, name in ranked]
        found += [name for name in self.close(query) if word not in name.lower()]
        return found[:limit], len(found)

    def close(self, word: str, limit: int = SUGGESTIONS_MAX) -> list[str]:
        """Up to `limit` names like `word`, best first (ties by name), none much worse than the best."""
        found = process.extract(word.lower(), self.lowered, scorer=fuzz.ratio, limit=limit * 4,
                                score_cutoff=CUTOFF * 100)
        scored = sorted((-score, self.names[i]) for _, score, i in found)[:limit]
        return [name for score, name in scored if score <= scored[0][0] + MARGIN * 100]


class Suggestions:
    """Name indexes per (revision, set path), shared by the threads of a worker."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        # revision -> (listed at, set path -> index); oldest first.
        self._revisions: collections.OrderedDict[str, tuple[float, dict[str, NameIndex]]] = \
            collections.OrderedDict()

    def listed(self, revision: str, pinned: bool) -> list[str]:
        """The set paths whose names are held for `revision` (the helper need not list them)."""
        with self._lock:
            entry = self._entry(revision, pinned)
            return sorted(entry[1]) if entry else []

    def learn(self, revision: str, pinned: bool, names: dict[str, Sequence[str]]) -> None:
        with self._lock:
            entry = self._entry(revision, pinned) or (self.clock(), {})
            entry[1].update((path, NameIndex(listed)) for path, listed in names.items())
            self._revisions[revision] = entry
            self._revisions.move_to_end(revision)
            while len(self._revisions) > REVISIONS_KEPT:
                self._revisions.popitem(last=False)

    def index(self, revision: str, pinned: bool, set_path: str = "") -> Optional[NameIndex]:
        """The names held for `revision`'s set at `set_path`, if they are (and not too old)."""
        with self._lock:
            entry = self._entry(revision, pinned)
            return entry[1].get(set_path) if entry else None

    def suggest(self, revision: str, name: str, set_path: str) -> list[str]:
        """Full dotted names like `name` in the set at `set_path` ("" for the top level)."""
        with self._lock:
            entry = self._revisions.get(revision)
            index = entry[1].get(set_path) if entry else None
        if index is None:
            return []
        parts = name.split(".")
        above = set_path.split(".") if set_path else []
        if len(parts) <= len(above):
            return []
        failed, rest = parts[len(above)], parts[len(above) + 1:]
        return [".".join([*above, match, *rest]) for match in index.close(failed)]

    def _entry(self, revision: str, pinned: bool) -> Optional[tuple[float, dict[str, NameIndex]]]:
        entry = self._revisions.get(revision)
        if entry and not pinned and self.clock() - entry[0] > UNPINNED_TTL:
            del self._revisions[revision]
            return None
        return entry
