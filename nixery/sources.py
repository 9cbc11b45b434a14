"""Package sources: what Nix should import for a tag, and whether that is pinned.

A pinned source (a nixpkgs commit, a resolved git commit) yields a cache key:
the same key always means the same packages, so its manifests can be cached
in storage and served without running Nix. An unpinned one (a channel name,
a local directory) yields none and is built each time; its layers are still
reused through their content-keyed records.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional, Protocol

from .config import Config, SourceKind, redact_url
from .errors import manifest_unknown
from .nix import SourceArgs

COMMIT_RE = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A tag's meaning: `cache_key` names the fixed revision (None when it can move).

    What Nix imports is only prepared when Nix runs: a git checkout costs an
    export, which a request answered from the manifest cache must not pay.
    """

    cache_key: Optional[str]
    prepare: Callable[[], SourceArgs]

    @functools.cached_property
    def args(self) -> SourceArgs:
        return self.prepare()

    @classmethod
    def ready(cls, args: SourceArgs, cache_key: Optional[str]) -> "Resolved":
        return cls(cache_key, lambda: args)


class Source(Protocol):
    def resolve(self, tag: str) -> Resolved:
        """Raises a MANIFEST_UNKNOWN RegistryError for a tag this source does not serve."""


class PathSource:
    """NIXERY_PKGS_PATH: a directory that may change at any time, so only `latest` and never pinned."""

    def __init__(self, path: str):
        self.path = path

    def resolve(self, tag: str) -> Resolved:
        if tag != "latest":
            raise manifest_unknown(f"tag {tag} is not served: a local package set only has 'latest'",
                                   {"tag": tag})
        return Resolved.ready(SourceArgs("path", self.path, f"package set at {self.path}"), None)


class ChannelSource:
    """nixpkgs from a tarball URL: `latest` is the configured channel, 40-hex tags are commits.

    Only a commit pins the tarball; a channel moves, and Nix's own tarball TTL
    decides when it is downloaded again. The cache key holds the whole URL, so
    a template serving other trees (a fork, a test) never shares cached manifests.
    """

    def __init__(self, channel: str, url_template: str, allowed: tuple[str, ...]):
        self.channel = channel
        self.url_template = url_template
        self.allowed = allowed

    def resolve(self, tag: str) -> Resolved:
        if tag == "latest":
            rev = self.channel
        elif COMMIT_RE.fullmatch(tag) or tag in self.allowed:
            rev = tag
        else:
            raise manifest_unknown(f"tag {tag} is neither 'latest', a nixpkgs commit nor an allowed channel",
                                   {"tag": tag})
        url = self.url_template.replace("{rev}", rev)
        pinned = COMMIT_RE.fullmatch(rev) is not None
        return Resolved.ready(SourceArgs("tarball", url, f"nixpkgs {rev}"),
                              f"tarball:{redact_url(url)}" if pinned else None)


def make_source(config: Config) -> Source:
    """The configured source; pygit2 is only imported when a git repository is."""
    if config.source.kind is SourceKind.PATH:
        return PathSource(config.source.argument)
    if config.source.kind is SourceKind.CHANNEL:
        return ChannelSource(config.source.argument, config.channel_url_template, config.channel_allow)
    from .git import GitSource
    return GitSource(config)
