"""Storage backends: where blobs, layer records and pinned manifests live.

Keys are plain strings of a fixed shape (`layers/sha256:<hex>`,
`builds/<hex>`, `manifests/<hex>`) and are checked by `check_key` in every
backend, so no client input can name a file or object outside the store.
The HTTP layer asks `locate` how to hand a blob to a client: the bytes of a
local file, or a redirect. Backends never see a request.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import re
from typing import BinaryIO, Iterator, Optional, Union

from ..manifest import SHA256_RE

_KEY_RE = re.compile(r"(layers/sha256:[a-f0-9]{64}|(builds|manifests)/[a-f0-9]{64})")


class StorageError(Exception):
    """The backend failed or is unreachable; the message is one line, fit for a client."""


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def blob_key(digest: str) -> str:
    """The key of a blob; `digest` must already have passed `image.validate_digest`."""
    if not SHA256_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return f"layers/{digest}"


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    size: int
    media_type: str


@dataclasses.dataclass(frozen=True)
class LocalFile:
    path: str
    info: BlobInfo


@dataclasses.dataclass(frozen=True)
class Redirect:
    url: str
    info: BlobInfo


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """An object as a listing of storage saw it, for the collector (nixery/collector.py).

    `used` is when it was last written, pulled or reused (seconds since the epoch); `version`
    what it was then, so that a deletion removes it only if nobody has used or rewritten it since;
    `media_type` is None where the backend cannot tell without a read (a large file: no manifest)."""

    key: str
    size: int
    used: float
    version: str
    media_type: Optional[str]


class Lease(abc.ABC):
    """One collection at a time across workers and instances sharing the storage."""

    # When the last collection under this lease finished (0: never), so a worker that finds the
    # lease free does not collect again right after another one did.
    previous: float

    @abc.abstractmethod
    def renew(self) -> bool:
        """Keeps the lease for another term; False if it was lost (the holder must stop)."""

    @abc.abstractmethod
    def finish(self, when: float) -> None:
        """Records that a collection finished at `when` and lets the lease go."""


class Upload(abc.ABC):
    """A blob being written: write to `file`, then `commit` it under its key once known."""

    file: BinaryIO

    @abc.abstractmethod
    def commit(self, key: str, media_type: str) -> None:
        """Makes the written bytes visible at `key`, all at once; a no-op if `key` already exists."""


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def stat(self, key: str) -> Optional[BlobInfo]:
        """Size and media type of the object at `key`, or None if absent."""

    @abc.abstractmethod
    def read(self, key: str) -> Optional[bytes]:
        """The whole (small) object at `key`, or None if absent."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes, media_type: str) -> None:
        """Stores a small object atomically."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, media_type: str) -> None:
        """Stores a small content-addressed object unless one is at `key` already (it holds the
        same bytes): so an image rebuilt on full or read-only storage is still served when all
        its blobs are there, and two writers of one blob at once leave one object."""

    @abc.abstractmethod
    def upload(self) -> contextlib.AbstractContextManager[Upload]:
        """A streaming upload; leaving the block uncommitted (or with an error) discards it."""

    @abc.abstractmethod
    def locate(self, key: str) -> Optional[Union[LocalFile, Redirect]]:
        """How a client gets the blob at `key`, or None if absent."""

    def check(self) -> None:
        """Raises StorageError if the backend cannot be used (called at start-up)."""

    @abc.abstractmethod
    def objects(self) -> Iterator[StoredObject]:
        """Every blob, layer record and pinned manifest (not unfinished uploads)."""

    @abc.abstractmethod
    def unchanged(self, listed: StoredObject) -> bool:
        """Whether the object `listed` names is still there, neither used nor rewritten since."""

    @abc.abstractmethod
    def delete(self, listed: StoredObject) -> bool:
        """Removes the object `listed` names, unless it was used or rewritten since it was listed;
        True if it is gone."""

    @abc.abstractmethod
    def touch(self, key: str) -> None:
        """Marks the object at `key` used now (a pulled manifest, a blob a build reuses), so that
        collections keep it for their grace period; nothing happens if it is absent. Never raises:
        a mark that cannot be written (read-only storage, an outage) is logged, and the pull or
        build that made it goes on."""

    @abc.abstractmethod
    def lease(self, term: float) -> contextlib.AbstractContextManager[Optional[Lease]]:
        """The collection lease for `term` seconds (renewable), or None while another holds it."""

