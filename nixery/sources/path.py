"""NIXERY_PKGS_PATH: a local package set, served as `latest` only."""

from __future__ import annotations

from ..nix import SourceArgs
from . import Resolved, UnknownTag


class PathSource:
    """NIXERY_PKGS_PATH: a directory that may change at any time, so only `latest` and never pinned."""

    def __init__(self, path: str):
        self.path = path

    def resolve(self, tag: str) -> Resolved:
        if tag != "latest":
            raise UnknownTag(tag, f"tag {tag} is not served: a local package set only has 'latest'")
        return Resolved.ready(SourceArgs("path", self.path, f"package set at {self.path}"), None)

    def tags(self) -> list[str]:
        return ["latest"]
