"""NIXERY_PKGS_PATH: a local package set, served as `latest` only."""

from __future__ import annotations

from ..errors import manifest_unknown
from ..nix import SourceArgs
from . import Resolved


class PathSource:
    """NIXERY_PKGS_PATH: a directory that may change at any time, so only `latest` and never pinned."""

    def __init__(self, path: str):
        self.path = path

    def resolve(self, tag: str) -> Resolved:
        if tag != "latest":
            raise manifest_unknown(f"tag {tag} is not served: a local package set only has 'latest'",
                                   {"tag": tag})
        return Resolved.ready(SourceArgs("path", self.path, f"package set at {self.path}"), None)

    def tags(self) -> list[str]:
        return ["latest"]
