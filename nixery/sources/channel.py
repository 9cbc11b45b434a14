"""NIXERY_CHANNEL: nixpkgs tarballs named by channel or commit through the URL template."""

from __future__ import annotations

from typing import Optional

from ..config import redact_url
from ..nix import SourceArgs
from . import COMMIT_RE, RefusedTag, Resolved, UnknownTag


class ChannelSource:
    """nixpkgs from a tarball URL: `latest` is the configured channel, 40-hex tags are commits.

    Only a commit pins the tarball; a channel moves, and Nix's own tarball TTL
    decides when it is downloaded again. The cache key holds the whole URL, so
    a template serving other trees (a fork, a test) never shares cached manifests.
    """

    def __init__(self, channel: str, url_template: str, allowed: tuple[str, ...],
                 commits: Optional[tuple[str, ...]] = None):
        """`commits`: those a tag may name (NIXERY_CHANNEL_COMMITS), None for any."""
        self.channel = channel
        self.url_template = url_template
        self.allowed = allowed
        self.commits = commits

    def tags(self) -> list[str]:
        return sorted({"latest", *self.allowed, *(self.commits or ())})

    def resolve(self, tag: str) -> Resolved:
        if tag == "latest":
            rev = self.channel
        elif tag in self.allowed:
            rev = tag
        elif COMMIT_RE.fullmatch(tag):
            self._check_commit(tag)
            rev = tag
        else:
            raise UnknownTag(tag, f"tag {tag} is neither 'latest', a nixpkgs commit nor an allowed channel")
        url = self.url_template.replace("{rev}", rev)
        pinned = COMMIT_RE.fullmatch(rev) is not None
        return Resolved.ready(SourceArgs("tarball", url, f"nixpkgs {rev}"),
                              f"tarball:{redact_url(url)}" if pinned else None,
                              redact_url(url), rev if pinned else None)

    def _check_commit(self, commit: str) -> None:
        """A commit tag selects Nix code of anyone's choosing (the archive URL serves every fork's
        commits): refused, before Nix runs, unless the configuration allows it."""
        if self.commits is None or commit in self.commits:
            return
        which = ("no nixpkgs commit by tag" if not self.commits
                 else "only the nixpkgs commits its operator listed")
        raise RefusedTag(commit, f"tag {commit} names a nixpkgs commit, and this instance builds {which} "
                                 f"(NIXERY_CHANNEL_COMMITS): pull 'latest' or an allowed channel")
