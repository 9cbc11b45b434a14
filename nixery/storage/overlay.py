"""A storage that reads through to another and writes only to its own.

`nixery build` and `nixery push` make the image a pull would give, reusing the
layers (and pinned manifests) the configured storage already holds, without
writing there unless asked: what they make goes to a scratch storage of their
own (a temporary directory), and every read looks there first, then in the
configured storage.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

from . import Backend, BlobInfo, Lease, LocalFile, Redirect, StoredObject, Upload


class Overlay(Backend):
    """Reads `scratch`, then `lower`; writes `scratch` only (a blob `lower` has is not written again)."""

    name = "overlay"

    def __init__(self, lower: Backend, scratch: Backend):
        self.lower = lower
        self.scratch = scratch

    def stat(self, key: str) -> Optional[BlobInfo]:
        return self.scratch.stat(key) or self.lower.stat(key)

    def read(self, key: str) -> Optional[bytes]:
        data = self.scratch.read(key)
        return data if data is not None else self.lower.read(key)

    def write(self, key: str, data: bytes, media_type: str) -> None:
        self.scratch.write(key, data, media_type)

    def put_if_absent(self, key: str, data: bytes, media_type: str) -> None:
        if self.lower.stat(key) is None:
            self.scratch.put_if_absent(key, data, media_type)

    def upload(self) -> contextlib.AbstractContextManager[Upload]:
        return self.scratch.upload()

    def locate(self, key: str) -> Optional[Union[LocalFile, Redirect]]:
        return self.scratch.locate(key) or self.lower.locate(key)

    def check(self) -> None:
        self.scratch.check()

    # Marks of use and collections (nixery/collector.py) touch the scratch storage only: the lower
    # one is not written.
    def objects(self) -> Iterator[StoredObject]:
        return self.scratch.objects()

    def unchanged(self, listed: StoredObject) -> bool:
        return self.scratch.unchanged(listed)

    def delete(self, listed: StoredObject) -> bool:
        return self.scratch.delete(listed)

    def touch(self, key: str) -> None:
        self.scratch.touch(key)

    def lease(self, term: float) -> contextlib.AbstractContextManager[Optional[Lease]]:
        return self.scratch.lease(term)
