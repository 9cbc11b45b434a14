"""An image made without a server, as a pull would get it: what `nixery build` writes and
`nixery push` sends.

The builder is the server's own (nixery/app.py `make_builder`, from the same
configuration variables), so the manifest, the config and every layer have the
digests a pull of the same name and revision gets. It reuses what the
configured storage holds (layers, pinned manifests) but writes there only when
asked (`store`): otherwise what it makes goes to a temporary directory
(nixery/storage/overlay.py), removed when the command ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import tempfile
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from . import image as images
from .config import Config
from .manifest import ENTRY_MEDIA_TYPES, Document
from .stats import BuildStats
from .storage import Backend, LocalFile, StorageError, blob_key

log = logging.getLogger(__name__)

# Seconds a blob download from a redirect (a bucket's signed URL) may stall.
DOWNLOAD_TIMEOUT = 60


class CommandError(Exception):
    """What `nixery build` or `nixery push` tells its user, in one line, before exiting non-zero."""


@dataclasses.dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclasses.dataclass(frozen=True)
class LocalImage:
    """`top` is what a pull of `name:tag` gets (one manifest, or an index of one per platform),
    `manifests` each platform's manifest (`top` alone for one), `blobs` their configs and
    layers (each once), all readable from `storage`."""

    name: str
    tag: str
    top: Document
    manifests: tuple[Document, ...]
    blobs: tuple[Blob, ...]
    storage: Backend
    stats: BuildStats

    def describe(self) -> str:
        """What was built and what reused, for the user."""
        if self.stats.cached:
            return "its stored manifest reused"
        return f"{self.stats.layers_built} layers built, {self.stats.layers_reused} reused from storage"

    def open(self, digest: str) -> BinaryIO:
        """A blob's bytes: a stored file, or a download from where the storage redirects to."""
        location = self.storage.locate(blob_key(digest))
        if location is None:
            raise CommandError(f"blob {digest} is missing from storage")
        if isinstance(location, LocalFile):
            return open(location.path, "rb")
        return urllib.request.urlopen(location.url, timeout=DOWNLOAD_TIMEOUT)

    @contextlib.contextmanager
    def reading(self, blob: Blob) -> Iterator[BinaryIO]:
        """A blob's bytes to read through, checked against its size and digest once read."""
        with self.open(blob.digest) as f:
            checked = _Checked(f)
            yield checked
        if checked.size != blob.size or f"sha256:{checked.hash.hexdigest()}" != blob.digest:
            raise CommandError(f"blob {blob.digest} in storage does not match its digest or size")


class _Checked(io.RawIOBase):
    """A file read through, hashing and counting what is read."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def name_and_tag(reference: str, default_tag: str) -> Optional[tuple[str, str]]:
    """`NAME[:TAG]` split (`default_tag` when no tag is given), or None when either part is
    not of the spec's grammar."""
    name, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        name, tag = reference, default_tag
    try:
        images.validate_name(name)
        images.validate_tag(tag)
    except (images.InvalidName, images.InvalidTag):
        return None
    return name, tag


def split_reference(reference: str) -> tuple[str, str]:
    """`NAME[:TAG]` (the tag `latest` when none), checked against the spec's grammar."""
    split = name_and_tag(reference, "latest")
    if split is None:
        raise CommandError(f"{reference!r} is not an image name (NAME or NAME:TAG, as in a pull)")
    return split


def platform_choice(requested: Optional[str]) -> Callable[[Sequence[str]], Sequence[str]]:
    """From the configured platforms (NIXERY_PLATFORMS, or those Nix builds), those `--platform`
    names: `all`, or a comma-separated list; by default the first, which is what a pull of a
    name without `arm64/` is built for."""
    def choose(configured: Sequence[str]) -> Sequence[str]:
        if not requested:
            return tuple(configured[:1])
        if requested == "all":
            return tuple(configured)
        wanted = [p.strip() for p in requested.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in configured]
        if unknown or not wanted:
            raise CommandError(f"--platform {requested}: this configuration offers {', '.join(configured)} "
                               "(NIXERY_PLATFORMS), or all of them")
        return tuple(p for p in configured if p in wanted)
    return choose


def _lower_storage(config: Config) -> Optional[Backend]:
    """The configured storage to reuse, or None: a filesystem storage that does not exist is not created."""
    from .app import make_storage
    if config.storage_backend == "filesystem" and not config.storage_path.is_dir():
        return None
    try:
        return make_storage(config)
    except StorageError as e:
        log.warning("configured storage not reused", extra={"reason": str(e)})
        return None


@contextlib.contextmanager
def built(config: Config, reference: str, media_type: str, *, platform: Optional[str] = None,
          store: bool = False) -> Iterator[LocalImage]:
    """The image `reference` names, built (or found) as `media_type` (a list or index type: with one
    platform chosen, the single-image type it lists, as the server answers); with `store`, written
    to the configured storage."""
    from .app import make_builder, make_storage
    from .error_handlers import as_registry_error
    from .storage.filesystem import FilesystemBackend
    from .storage.overlay import Overlay
    name, tag = split_reference(reference)
    with tempfile.TemporaryDirectory(prefix="nixery-build-") as scratch:
        try:
            storage: Backend
            if store:
                storage = make_storage(config)
            else:
                lower, own = _lower_storage(config), FilesystemBackend(Path(scratch))
                storage = Overlay(lower, own) if lower else own
            builder = make_builder(config, storage, platforms=platform_choice(platform))
            result = builder.manifest(images.parse(name, tag, config.limits.max_packages), media_type)
        except CommandError:
            raise
        except Exception as e:
            # Told as the server tells its clients; what it would call an internal error is a bug,
            # whose traceback the user should see.
            told = as_registry_error(e)
            if told.message.startswith("internal error"):
                raise
            raise CommandError(f"{name}:{tag}: {told.message}") from None
        manifests = _manifests(storage, result.manifest)
        yield LocalImage(name, tag, result.manifest, manifests, _blobs(manifests), storage, result.stats)


def _manifests(storage: Backend, top: Document) -> tuple[Document, ...]:
    if top.media_type not in ENTRY_MEDIA_TYPES:
        return (top,)
    found = []
    for entry in json.loads(top.data)["manifests"]:
        data = storage.read(blob_key(entry["digest"]))
        if data is None:
            raise CommandError(f"manifest {entry['digest']} is missing from storage")
        found.append(Document(entry["mediaType"], data))
    return tuple(found)


def _blobs(manifests: Sequence[Document]) -> tuple[Blob, ...]:
    blobs: dict[str, Blob] = {}
    for document in manifests:
        parsed = json.loads(document.data)
        for entry in (parsed["config"], *parsed["layers"]):
            blobs.setdefault(entry["digest"], Blob(entry["digest"], entry["size"], entry["mediaType"]))
    return tuple(blobs.values())
