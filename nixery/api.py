"""The registry's HTTP resources (distribution spec, pull side only).

Thin by design: parse and validate the request, call the builder or the
storage, set headers. Repository names contain slashes, so everything below
`/v2/` goes through one sink that matches the spec's path shapes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Optional

import falcon

from . import image
from .builder import Builder, BuildStats
from .errors import RegistryError, blob_unknown, manifest_unknown
from .manifest import MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE, Document, as_oci
from .storage import Backend, LocalFile, Redirect, StorageError, blob_key

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_PUSH_RE = re.compile(r"^/v2/.+/(blobs/uploads(/.*)?|manifests/[^/]+|blobs/[^/]+)$")
# At most 19 digits: any larger number is beyond every blob (and int() refuses huge ones).
_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
# Nixery builds Docker schema 2 manifests, and gives the OCI form to clients that take only that.
_DOCKER_ACCEPTS = (MANIFEST_MEDIA_TYPE, "*/*", "application/*")
MANIFEST_MEDIA_TYPES = (MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE)
READ_METHODS = ("GET", "HEAD")


class _LimitedReader:
    """A file object that ends after `remaining` bytes (a Range response).

    It has the file's `fileno`, so Gunicorn sends the range with sendfile(2) from the
    current offset for Content-Length bytes; a server without sendfile reads it."""

    def __init__(self, f, remaining: int):
        self.f = f
        self.remaining = remaining

    def fileno(self) -> int:
        return self.f.fileno()

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self.f.read(size)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


class VersionCheck:
    """`/v2/`: tells clients this is a registry (nixery/auth.py challenges them first when a login is needed)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/json"
        resp.data = b"{}"

    on_head = on_get


class Registry:
    """The sink for everything below `/v2/`."""

    def __init__(self, builder: Builder, storage: Backend):
        self.builder = builder
        self.storage = storage

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        match = _PATH_RE.match(req.path)
        if req.method not in READ_METHODS:
            if _PUSH_RE.match(req.path):
                raise RegistryError(405, "UNSUPPORTED", "this registry is read-only: it builds images, "
                                    "it does not accept pushes or deletes", {"method": req.method})
            raise RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": req.path})
        if match is None:
            raise RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": req.path})
        name, kind, reference = match.group("name", "kind", "reference")
        image.validate_name(name)
        try:
            if kind == "blobs":
                self.blob(req, resp, reference)
            else:
                if ":" in reference:
                    self.manifest_by_digest(req, resp, reference)
                else:
                    self.manifest_by_tag(req, resp, name, reference)
        except StorageError as e:
            raise RegistryError(503, "UNAVAILABLE", f"storage failed: {e}") from None

    def manifest_by_tag(self, req: falcon.Request, resp: falcon.Response, name: str, tag: str) -> None:
        media_type = _negotiate(req)
        # req.context.build is what the metrics and the recent-builds page learn of this request.
        started = time.monotonic()
        try:
            result = self.builder.manifest(image.parse(name, tag), req.context.get("authorise_build"))
        except Exception as e:
            req.context.build = _failed_build(name, tag, e, time.monotonic() - started)
            raise
        req.context.build = dataclasses.replace(result.stats, tag=tag,
                                                duration=round(time.monotonic() - started, 3))
        document = result.manifest
        if media_type == OCI_MANIFEST_MEDIA_TYPE:
            document = as_oci(document)
            # Stored too, so that the client can fetch it again by the digest it was given.
            if self.storage.stat(blob_key(document.digest)) is None:
                self.storage.write(blob_key(document.digest), document.data, document.media_type)
        self._manifest(req, resp, document)

    def manifest_by_digest(self, req: falcon.Request, resp: falcon.Response, digest: str) -> None:
        # Layers and configs share the content store: only a manifest is served as one
        # (and only a manifest, which is small, is ever read into memory).
        info = self.storage.stat(blob_key(digest)) if image.validate_digest(digest) else None
        data = self.storage.read(blob_key(digest)) if info and info.media_type in MANIFEST_MEDIA_TYPES else None
        if data is None:
            raise manifest_unknown("manifest unknown", {"digest": digest})
        self._manifest(req, resp, Document(info.media_type, data))

    @staticmethod
    def _manifest(req: falcon.Request, resp: falcon.Response, document: Document) -> None:
        resp.content_type = document.media_type
        resp.set_header("Docker-Content-Digest", document.digest)
        resp.set_header("ETag", f'"{document.digest}"')
        resp.content_length = len(document.data)
        if req.method == "GET":
            resp.data = document.data

    def blob(self, req: falcon.Request, resp: falcon.Response, digest: str) -> None:
        if not image.validate_digest(digest):
            raise blob_unknown(digest)
        location = self.storage.locate(blob_key(digest))
        if location is None:
            raise blob_unknown(digest)
        size = location.info.size
        redirect = isinstance(location, Redirect) and req.method == "GET"
        start, end = (0, size) if redirect else _byte_range(req.get_header("Range"), size)
        resp.content_type = location.info.media_type
        resp.set_header("Docker-Content-Digest", digest)
        resp.set_header("ETag", f'"{digest}"')
        if redirect:
            resp.status = falcon.HTTP_307
            resp.location = location.url
            return
        resp.set_header("Accept-Ranges", "bytes")
        resp.content_length = end - start
        if start or end != size:
            resp.status = falcon.HTTP_206
            resp.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if req.method == "HEAD":
            return
        assert isinstance(location, LocalFile)
        f = open(location.path, "rb")
        if start or end != size:
            f.seek(start)
            resp.stream = _LimitedReader(f, end - start)
        else:
            resp.stream = f  # whole files go out through wsgi.file_wrapper (sendfile)


def _failed_build(name: str, tag: str, error: Exception, duration: float) -> BuildStats:
    """A failed manifest request, with the reason its client was given (the error handlers' wording)."""
    if isinstance(error, RegistryError):
        reason, status = error.message, error.status
    else:
        reason, status = f"internal error: {type(error).__name__}", 500
    return BuildStats(image=name, tag=tag, duration=round(duration, 3), reason=reason, status=status)


def _byte_range(header: Optional[str], size: int) -> tuple[int, int]:
    """[start, end) for a single-range `Range` header; the whole blob when absent."""
    if not header:
        return 0, size
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise _unsatisfiable(header, size)
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        raise _unsatisfiable(header, size)
    return start, end


def _unsatisfiable(header: str, size: int) -> RegistryError:
    error = RegistryError(416, "RANGE_INVALID", "range not satisfiable", {"range": header, "size": size})
    error.headers["Content-Range"] = f"bytes */{size}"
    return error


def _negotiate(req: falcon.Request) -> str:
    """The manifest type to answer with: Docker schema 2 unless the client names only OCI.
    A client that names neither gets a clear 404 rather than a document it cannot parse."""
    offered = [part.split(";")[0].strip().lower() for part in (req.get_header("Accept") or "").split(",")]
    offered = [media_type for media_type in offered if media_type]
    if not offered or any(media_type in _DOCKER_ACCEPTS for media_type in offered):
        return MANIFEST_MEDIA_TYPE
    if OCI_MANIFEST_MEDIA_TYPE in offered:
        return OCI_MANIFEST_MEDIA_TYPE
    raise manifest_unknown(f"this registry serves {' or '.join(MANIFEST_MEDIA_TYPES)} manifests",
                           {"accept": offered})
