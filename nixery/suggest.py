"""Suggestions ("did you mean"): close attribute names for a name the package set lacks.

The names of a set come from the evaluation that found a name missing (the
helper lists the sets lookups stopped in, nested ones too), once per source
revision: the index is kept per revision and set, and the next evaluation is
told which sets it need not list again. Matching is cheap per request: the
names are grouped by length, and only those of about the same length go
through difflib's ratio (its quick upper bounds first), lower-cased, as the
helper's own lookup ignores case.
"""

from __future__ import annotations

import collections
import difflib
import threading
import time
from typing import Optional, Sequence

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
        self.by_length: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
        for name in sorted(set(names)):
            self.by_length[len(name)].append((name.lower(), name))

    def __len__(self) -> int:
        return sum(len(names) for names in self.by_length.values())

    def close(self, word: str, limit: int = SUGGESTIONS_MAX) -> list[str]:
        """Up to `limit` names like `word`, best first (ties by name)."""
        word = word.lower()
        # A ratio of CUTOFF or more needs lengths within this much of each other.
        slack = max(1, int(len(word) * (1 - CUTOFF) / CUTOFF) + 1)
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2(word)
        scored: list[tuple[float, str]] = []
        for length in range(max(1, len(word) - slack), len(word) + slack + 1):
            for lowered, name in self.by_length.get(length, ()):
                matcher.set_seq1(lowered)
                if (matcher.real_quick_ratio() >= CUTOFF and matcher.quick_ratio() >= CUTOFF
                        and (ratio := matcher.ratio()) >= CUTOFF):
                    scored.append((-ratio, name))
        scored.sort()
        return [name for score, name in scored[:limit] if score <= scored[0][0] + MARGIN]


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
