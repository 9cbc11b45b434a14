"""NIXERY_CHANNEL: nixpkgs tarballs named by channel or commit through the URL template."""

from __future__ import annotations

from ..config import redact_url
from ..errors import manifest_unknown
from ..nix import SourceArgs
from . import COMMIT_RE, Resolved


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

    def tags(self) -> list[str]:
        return sorted({"latest", *self.allowed})

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
                              f"tarball:{redact_url(url)}" if pinned else None,
                              redact_url(url), rev if pinned else None)
