"""Package sources: what Nix should import for a tag, and whether that is pinned.

A pinned source (a nixpkgs commit, a resolved git commit) yields a cache key:
the same key always means the same packages, so its manifests can be cached
in storage and served without running Nix. An unpinned one (a channel name,
a local directory) yields none and is built each time; its layers are still
reused through their content-keyed records.

One module per kind, like `storage/`: `channel` (nixpkgs tarballs), `git`
(a repository mirrored with pygit2) and `path` (a local directory); the app's
`make_source` picks the configured one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional, Protocol

from ..nix import SourceArgs

COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class SourceError(Exception):
    """What a source tells of a tag; the HTTP layer decides what a client is told (nixery/error_handlers.py)."""


class TagError(SourceError):
    """What a source tells of one tag, which it names (the error's detail for the client)."""

    def __init__(self, tag: str, message: str):
        super().__init__(message)
        self.tag = tag


class UnknownTag(TagError):
    """The source serves no such tag."""


class RefusedTag(TagError):
    """A tag the source could serve, which this instance's configuration refuses."""


class SourceUnavailable(SourceError):
    """The source cannot be read now (a git fetch failed): the instance's fault, not the tag's."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A tag's meaning: `cache_key` names the fixed revision (None when it can move).

    What Nix imports is only prepared when Nix runs: a git checkout costs an
    export, which a request answered from the manifest cache must not pay.
    """

    cache_key: Optional[str]
    prepare: Callable[[], SourceArgs]
    # Provenance for the image's labels (org.opencontainers.image.source / .revision): the
    # source's URL (credentials removed) and the pinned revision, where the source has them.
    # A local directory has neither: its path would differ between instances, and so would digests.
    source_url: Optional[str] = None
    revision: Optional[str] = None

    @functools.cached_property
    def args(self) -> SourceArgs:
        return self.prepare()

    @classmethod
    def ready(cls, args: SourceArgs, cache_key: Optional[str], source_url: Optional[str] = None,
              revision: Optional[str] = None) -> "Resolved":
        return cls(cache_key, lambda: args, source_url, revision)


class Source(Protocol):
    def resolve(self, tag: str) -> Resolved:
        """Raises UnknownTag for a tag this source does not serve, RefusedTag for one it may not."""

    def tags(self) -> list[str]:
        """The tags this source serves by name (`latest`, channels, branches and tags; not every
        commit, which any 40-hex tag names), for `/v2/<name>/tags/list`."""
