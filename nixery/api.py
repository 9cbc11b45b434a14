"""The registry's HTTP resources (distribution spec, pull side only).

Thin by design: parse and validate the request (with Falcon's own helpers for
ranges, negotiation and headers), call the builder or the storage, write the
response. Errors are raised and rendered by `error_handlers`. Each path shape
of the spec (nixery/routes.py) has its resource, whose responders get the
shape's named parameters.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Optional
from urllib.parse import urlencode

import falcon

from . import image, parking, routes, sbom
from .builder import ManifestBuilder
from .error_handlers import as_registry_error, operator_action
from .errors import RegistryError, blob_unknown, manifest_unknown
from .heal import Healer
from .limited import LimitedReader
from .manifest import (MANIFEST_LIST_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE,
                       Document)
from .pulls import Pulls
from .refusals import BuildRefused, ServerStopping
from .sources import Source
from .stats import BuildStats
from .storage import Backend, LocalFile, Redirect, blob_key

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
MANIFEST_MEDIA_TYPES = (MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE)
# The multi-platform type a client gets for each single-image type, when it names it in Accept.
INDEX_FOR = {MANIFEST_MEDIA_TYPE: MANIFEST_LIST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE: OCI_INDEX_MEDIA_TYPE}
# What a manifest request by digest may be answered with.
SERVED_MEDIA_TYPES = MANIFEST_MEDIA_TYPES + tuple(INDEX_FOR.values())


class VersionCheck:
    """`/v2/`: tells clients this is a registry (nixery/auth.py challenges them first when a login is needed)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/json"
        resp.data = b"{}"

    on_head = on_get


def read_only(req: falcon.Request, resp: falcon.Response, **_: str) -> None:
    """A push or delete, on a path that takes one in a registry that does."""
    raise RegistryError(405, "UNSUPPORTED", "this registry is read-only: it builds images, "
                        "it does not accept pushes or deletes", {"method": req.method})


def no_such_endpoint(req: falcon.Request, resp: falcon.Response, **_: str) -> None:
    raise RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": req.path})


class Manifests:
    """`/v2/{name}/manifests/{reference}`: a tag builds (or finds) the image, a digest reads a stored manifest."""

    def __init__(self, builder: ManifestBuilder, storage: Backend, max_packages: int = 0,
                 pulls: Optional[Pulls] = None, healer: Optional[Healer] = None):
        self.builder = builder
        self.storage = storage
        # NIXERY_MAX_PACKAGES: the most components a name may have (0: any number).
        self.max_packages = max_packages
        # Marks each manifest served as used, for the collector and the heal (nixery/pulls.py).
        self.pulls = pulls
        self.healer = healer

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, reference: str) -> None:
        image.validate_name(name)
        if ":" in reference:
            self.by_digest(req, resp, name, reference)
        else:
            self.by_tag(req, resp, name, reference)

    on_head = on_get

    def by_tag(self, req: falcon.Request, resp: falcon.Response, name: str, tag: str) -> None:
        media_type, index_only = _negotiate(req)
        # req.context.build is what the metrics and the build history learn of this request.
        started = time.monotonic() - parking.waited(req.env)
        try:
            result = self.builder.manifest(image.parse(name, tag, self.max_packages), media_type,
                                           index_only=index_only, **_requester(req))
        except (parking.Parked, BuildRefused, ServerStopping):
            # Parked: not an answer, the request runs again once the build it waits for is over.
            # Refused (or the server stopping): no build, so the recent builds and the metrics do not count it (anonymous
            # clients cannot crowd real failures off the page).
            raise
        except Exception as e:
            req.context.build = _failed_build(name, tag, e, time.monotonic() - started)
            raise
        req.context.build = dataclasses.replace(result.stats, tag=tag,
                                                duration=round(time.monotonic() - started, 3))
        if self.pulls:
            self.pulls.pulled(result.manifest.digest, name, tag, result.manifest.media_type)
        _send_manifest(req, resp, result.manifest)

    def by_digest(self, req: falcon.Request, resp: falcon.Response, name: str, digest: str) -> None:
        # Layers and configs share the content store: only a manifest is served as one
        # (and only a manifest, which is small, is ever read into memory).
        valid = image.validate_digest(digest)
        info = self.storage.stat(blob_key(digest)) if valid else None
        data = self.storage.read(blob_key(digest)) if info and info.media_type in SERVED_MEDIA_TYPES else None
        document = Document(info.media_type, data) if info and data is not None else None
        if document is None and valid and info is None and self.healer:  # collected or lost: built again
            document = self.healer.manifest(name, digest, **_requester(req))
        if document is None:
            raise manifest_unknown("manifest unknown", {"digest": digest})
        if self.pulls:
            self.pulls.pulled(digest)
        _send_manifest(req, resp, document)


class Tags:
    """`/v2/{name}/tags/list`: the tags the source serves: every name is an image of the same tags.
    `n` and `last` page through them in lexical order, with a `Link` to the next page (the
    distribution spec)."""

    def __init__(self, source: Source):
        self.source = source

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        image.validate_name(name)
        number = req.get_param("n")
        if number is not None and not (number.isdigit() and len(number) <= 6):
            raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested",
                                {"n": number})
        last = req.get_param("last")
        tags = [tag for tag in self.source.tags() if last is None or tag > last]
        if number is not None and int(number) < len(tags):
            tags = tags[:int(number)]
            if tags:
                # Quoted as the spec shows it (Falcon's append_link leaves rel unquoted).
                resp.set_header("Link", f'</v2/{name}/tags/list?{urlencode({"n": number, "last": tags[-1]})}>; rel="next"')
        resp.media = {"name": name, "tags": tags}

    on_head = on_get


class Referrers:
    """`/v2/{name}/referrers/{digest}`, OCI 1.1: an image index of the artifacts (the SBOM) whose subject is `digest`."""

    def __init__(self, storage: Backend):
        self.storage = storage

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, digest: str) -> None:
        image.validate_name(name)
        artifact_type = req.get_param("artifactType")
        # A digest of another algorithm cannot name anything here: it has no referrers.
        index = sbom.referrers(self.storage, digest if image.validate_digest(digest) else None, artifact_type)
        resp.content_type = index.media_type
        if artifact_type is not None:
            resp.set_header("OCI-Filters-Applied", "artifactType")
        resp.content_length = len(index.data)
        if req.method == "GET":
            resp.data = index.data

    on_head = on_get


def _requester(req: falcon.Request) -> dict:
    """Who asks, as the builder and the heal take it: whether the client may build (False for
    one the auth middleware lets read but not build), its address, and the worker's parking."""
    return {"may_build": req.context.get("may_build", True), "client": req.remote_addr or "",
            "parking": req.env.get(parking.ENVIRON_KEY)}


def _send_manifest(req: falcon.Request, resp: falcon.Response, document: Document) -> None:
    resp.content_type = document.media_type
    resp.set_header("Docker-Content-Digest", document.digest)
    resp.etag = document.digest
    resp.content_length = len(document.data)
    if req.method == "GET":
        resp.data = document.data


class Blobs:
    """`/v2/{name}/blobs/{digest}`: layers and configs, whole or a byte range, or a redirect to the storage."""

    def __init__(self, storage: Backend, healer: Optional[Healer] = None):
        self.storage = storage
        self.healer = healer

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, digest: str) -> None:
        image.validate_name(name)
        if not image.validate_digest(digest):
            raise blob_unknown(digest)
        location = self.storage.locate(blob_key(digest))
        if location is None and self.healer:
            location = self.healer.blob(name, digest, **_requester(req))
        if location is None:
            raise blob_unknown(digest)
        size = location.info.size
        redirect = isinstance(location, Redirect) and req.method == "GET"
        start, end = (0, size) if redirect else _byte_range(req, size)
        resp.content_type = location.info.media_type
        resp.set_header("Docker-Content-Digest", digest)
        resp.etag = digest
        if redirect:
            resp.status = falcon.HTTP_307
            resp.location = location.url
            return
        resp.accept_ranges = "bytes"
        resp.content_length = end - start
        if start or end != size:
            resp.status = falcon.HTTP_206
            resp.content_range = (start, end - 1, size)
        if req.method == "HEAD":
            return
        assert isinstance(location, LocalFile)
        f = open(location.path, "rb")
        if start or end != size:
            f.seek(start)
            resp.stream = LimitedReader(f, end - start)
        else:
            resp.stream = f  # whole files go out through wsgi.file_wrapper (sendfile)

    on_head = on_get


class Uploads:
    """`/v2/{name}/blobs/uploads/...`: where a push would go."""

    on_get = on_head = staticmethod(no_such_endpoint)


class Elsewhere:
    """Every other path below `/v2/`."""


def add_routes(router: routes.RegistryRouter, builder: ManifestBuilder, storage: Backend, source: Source,
               max_packages: int = 0, pulls: Optional[Pulls] = None, healer: Optional[Healer] = None) -> None:
    """One resource per path shape of the spec; pushes get 405, anything else not served 404."""
    router.add_shape(routes.MANIFESTS, Manifests(builder, storage, max_packages, pulls, healer), read_only)
    router.add_shape(routes.UPLOADS, Uploads(), read_only)
    router.add_shape(routes.BLOBS, Blobs(storage, healer), read_only)
    router.add_shape(routes.REFERRERS, Referrers(storage), no_such_endpoint)
    router.add_shape(routes.TAGS, Tags(source), no_such_endpoint)
    router.add_shape(routes.OTHER, Elsewhere(), no_such_endpoint)


def _failed_build(name: str, tag: str, error: Exception, duration: float) -> BuildStats:
    """A failed manifest request, with the reason its client is given (the error handlers' wording)."""
    told = as_registry_error(error)
    return BuildStats(image=name, tag=tag, duration=round(duration, 3), reason=told.message, status=told.status,
                      action=operator_action(error) if told.status >= 500 else None)


_RANGE_SPEC_RE = re.compile(r"(\d*)-(\d*)")
# Positions longer than this are past the end of any blob (and are never parsed as numbers).
_MAX_DIGITS = 18


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 1 << 63


def _byte_range(req: falcon.Request, size: int) -> tuple[int, int]:
    """[start, end) of the blob to send, per RFC 9110 section 14: the whole blob when there is no
    `Range`, when its unit is not bytes, when it is malformed (`bytes=5-3` included) and for several
    ranges (which a server may answer with the whole representation); 416 only for a well-formed
    single range that starts past the end."""
    unit, _, specs = req.get_header("Range", default="").partition("=")
    if unit.strip().lower() != "bytes" or "," in specs:
        return 0, size
    match = _RANGE_SPEC_RE.fullmatch(specs.strip())
    if not match or not any(match.groups()):
        return 0, size
    first, last = match.groups()
    if not first:  # a suffix: the last N bytes
        length = _position(last)
        if length == 0 or size == 0:
            raise _unsatisfiable(req.get_header("Range"), size)
        return max(0, size - length), size
    start = _position(first)
    if last and _position(last) < start:
        return 0, size
    if start >= size:
        raise _unsatisfiable(req.get_header("Range"), size)
    return start, size if not last else min(size, _position(last) + 1)


def _unsatisfiable(header: str, size: int) -> RegistryError:
    error = RegistryError(416, "RANGE_INVALID", "range not satisfiable", {"range": header, "size": size})
    error.headers["Content-Range"] = f"bytes */{size}"
    return error


def _negotiate(req: falcon.Request) -> tuple[str, bool]:
    """The manifest type to answer with, and whether it must be a list or index (the client
    takes no single manifest): Docker schema 2 unless the client takes only OCI, and the manifest
    list (or OCI index) of that type when the client names it in `Accept` (a `*/*` does not count:
    a client that never asked for a list would not know what to do with it). A client that names
    only a list or index gets one. A client that takes none of these gets a clear 404 rather than
    a document it cannot parse."""
    named = {part.split(";", 1)[0].strip().lower() for part in (req.accept or "").split(",")}
    for media_type in MANIFEST_MEDIA_TYPES:
        if req.client_accepts(media_type):
            return (INDEX_FOR[media_type] if INDEX_FOR[media_type] in named else media_type), False
    for index_type in INDEX_FOR.values():
        if index_type in named:
            return index_type, True
    raise manifest_unknown(f"this registry serves {' or '.join(MANIFEST_MEDIA_TYPES)} manifests",
                           {"accept": req.accept})
