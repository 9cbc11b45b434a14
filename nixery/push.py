"""`nixery push NAME[:TAG] DESTINATION`: the image a pull would give, pushed to another registry
over the distribution API, without a server.

Each blob (config, layers) is asked for first (HEAD): one the destination has is not sent
again. One it lacks is mounted from another repository of the same registry where this
machine pushed it before (or `--mount-from`), when the registry offers mounts (201), and
uploaded otherwise: in one PUT up to the chunk size, in PATCHes of it above. Blobs go up a
few at a time; the manifests last (each platform's, then the index, by tag), so a client
never sees a tag whose blobs are missing. A registry that asks for a login is answered
with the credentials Docker and skopeo keep (nixery/registry_login.py), as Basic or for a
token from the service its challenge names. Plain HTTP is used only for a loopback registry
(as Docker does) or with `--insecure`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import ssl
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional, Sequence

from . import config as configuration
from . import image as images
from .atomic import write_atomic
from .limited import LimitedReader
from .local import Blob, CommandError, LocalImage, built, name_and_tag, split_reference
from .manifest import ENTRY_MEDIA_TYPES, MANIFEST_LIST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE, Document
from .registry_login import Credential, find, parse_challenge, token_of, token_request

log = logging.getLogger(__name__)

# Blobs up to this size go up in one request; bigger ones in PATCHes of it.
DEFAULT_CHUNK = 64 << 20
# Blobs sent at once (Docker's default for pushes is 5).
DEFAULT_JOBS = 4
TIMEOUT = 300
SEND_BLOCK = 1 << 20
# Repositories one blob is remembered in, for mounts; digests remembered per registry.
REPOSITORIES_PER_BLOB = 3
BLOBS_REMEMBERED = 20000
# Repositories a token asks to read from, for mounts.
MOUNT_SOURCES = 8
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@dataclasses.dataclass(frozen=True)
class Destination:
    host: str
    repository: str
    tag: str

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"


def parse_destination(text: str, default_tag: str) -> Destination:
    """`docker://HOST[:PORT]/REPOSITORY[:TAG]` (the `docker://` optional, the tag the source's by default)."""
    rest = text.removeprefix("docker://")
    host, slash, path = rest.partition("/")
    usage = f"{text!r} is not a destination: give docker://HOST[:PORT]/REPOSITORY[:TAG]"
    if not slash or not _HOST_RE.fullmatch(host) or not ("." in host or ":" in host or host == "localhost"):
        raise CommandError(usage)
    split = name_and_tag(path, default_tag) if "@" not in path else None
    if split is None:
        raise CommandError(usage)
    return Destination(host, *split)


def same_origin(url: str, base: str) -> bool:
    """Whether `url` is on the registry at `base`: scheme, host and port alike (a port left out is
    the scheme's). Credentials go only there: an upload URL on another host, or on this host over
    plain HTTP (a registry behind a TLS proxy that names itself `http://`), gets none, as Docker's
    client sends them only to the endpoint they were asked for by."""
    def origin(text: str) -> tuple[str, str, Optional[int]]:
        parts = urllib.parse.urlsplit(text)
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"https": 443, "http": 80}.get(
            parts.scheme.lower())
    try:
        return origin(url) == origin(base)
    except ValueError:  # a port that is no number
        return False


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def error(self) -> str:
        """The registry's own message (its JSON error body), or the status."""
        try:
            errors = json.loads(self.body)["errors"]
            return f"HTTP {self.status}: " + "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip()
                                                      for e in errors)
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"HTTP {self.status}"


# What a request sends: a callable that opens the body afresh (a retry sends it again) with its length.
Body = Callable[[], tuple[BinaryIO, int]]


class Registry:
    """One repository of a registry, over the distribution API, logged in as its challenge asks."""

    def __init__(self, destination: Destination, credential: Optional[Credential], *, insecure: bool = False,
                 mount_sources: Sequence[str] = ()):
        self.destination = destination
        self.credential = credential
        self.insecure = insecure
        self.scopes = [f"repository:{destination.repository}:pull,push",
                       *(f"repository:{source}:pull" for source in mount_sources)]
        self.base = f"https://{destination.host}"
        self.authorization: Optional[str] = None
        self.lock = threading.Lock()
        self.local = threading.local()

    @property
    def repository_path(self) -> str:
        return f"/v2/{self.destination.repository}"

    def connect(self) -> None:
        """Finds how the registry is spoken to (HTTPS, else plain HTTP where allowed) and logs in."""
        schemes = ["https", "http"] if self.insecure or _loopback(self.destination.host) else ["https"]
        failure: Exception = CommandError("no scheme")
        for scheme in schemes:
            self.base = f"{scheme}://{self.destination.host}"
            try:
                response = self.request("GET", "/v2/")
            except (OSError, http.client.HTTPException) as e:
                failure = e
                continue
            if response.status == 200:
                return
            if response.status == 401:
                raise CommandError(f"{self.destination.host} refused the login: {response.error()}")
            raise CommandError(f"{self.destination.host} does not answer as a registry: {response.error()}")
        raise CommandError(f"cannot reach {self.destination.host}: {type(failure).__name__}: {failure}")

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        connections = self.local.__dict__.setdefault("connections", {})
        if (scheme, netloc) not in connections:
            if scheme == "https":
                context = ssl.create_default_context()
                if self.insecure:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                connections[scheme, netloc] = http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=context,
                                                                          blocksize=SEND_BLOCK)
            else:
                connections[scheme, netloc] = http.client.HTTPConnection(netloc, timeout=TIMEOUT,
                                                                         blocksize=SEND_BLOCK)
        return connections[scheme, netloc]

    def _send(self, method: str, url: str, headers: dict[str, str], body: Optional[Body]) -> Response:
        """One request on this thread's kept-alive connection; once more on a new one if the
        registry had closed it."""
        try:
            return self._attempt(method, url, headers, body)
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            return self._attempt(method, url, headers, body)

    def _attempt(self, method: str, url: str, headers: dict[str, str], body: Optional[Body]) -> Response:
        parts = urllib.parse.urlsplit(url)
        connection = self._connection(parts.scheme, parts.netloc)
        with contextlib.ExitStack() as opened:
            content = None
            if body is not None:
                stream, length = body()
                content = opened.enter_context(stream)
                headers = {**headers, "Content-Length": str(length)}
            try:
                connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=content,
                                   headers=headers)
                answer = connection.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException):
                connection.close()  # the next request opens a new one
                raise
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)

    def request(self, method: str, path_or_url: str, headers: Optional[dict[str, str]] = None,
                body: Optional[Body] = None) -> Response:
        """A request to the registry; a 401 logs in (again) and sends it once more. The
        credentials go only to the registry's own host (not to an upload URL elsewhere)."""
        url = urllib.parse.urljoin(self.base + "/", path_or_url)
        own = same_origin(url, self.base)
        for attempt in range(2):
            sent = dict(headers or {})
            if own and self.authorization:
                sent["Authorization"] = self.authorization
            response = self._send(method, url, sent, body)
            if response.status != 401 or attempt or not own:
                return response
            self._login(response.headers.get("www-authenticate", ""))
        return response

    def _login(self, header: str) -> None:
        challenge = parse_challenge(header)
        host = self.destination.host
        with self.lock:
            if challenge is None or challenge.scheme not in ("basic", "bearer"):
                raise CommandError(f"{host} asks for a login nixery cannot give ({header or 'no challenge'})")
            if challenge.scheme == "basic":
                if not self.credential or self.credential.identity_token:
                    raise CommandError(f"{host} asks for a user and password, and none are stored for it "
                                       "(docker login, skopeo login, REGISTRY_AUTH_FILE or --authfile)")
                self.authorization = self.credential.basic()
                return
            url, form, headers = token_request(challenge, self.scopes, self.credential)
            if self.base.startswith("https://") and not url.startswith("https://"):
                raise CommandError(f"{host}'s token service is plain HTTP ({url.split('?')[0]}): nixery sends "
                                   "no credentials there from a registry it reached over HTTPS")
            answer = self._send("POST" if form is not None else "GET", url, headers,
                                (lambda: (io.BytesIO(form), len(form))) if form is not None else None)
            if answer.status != 200:
                raise CommandError(f"{host}'s token service refused a token for {', '.join(self.scopes)}: "
                                   f"{answer.error()}")
            self.authorization = f"Bearer {token_of(answer.body)}"

    def expect(self, response: Response, statuses: Sequence[int], what: str) -> Response:
        if response.status in (401, 403):
            raise CommandError(f"{what}: {self.destination.host} refused the login: {response.error()}")
        if response.status not in statuses:
            raise CommandError(f"{what}: {self.destination.host} answered {response.error()}")
        return response

    def has_blob(self, digest: str) -> bool:
        """HEAD of the blob in this repository (a redirect to where it is stored says it is there)."""
        response = self.request("HEAD", f"{self.repository_path}/blobs/{digest}")
        if response.status == 404:
            return False
        self.expect(response, (200, 301, 302, 303, 307, 308), f"checking blob {digest}")
        return True

    def start_upload(self, digest: str, source: Optional[str]) -> Optional[tuple[str, int]]:
        """An upload session's URL and the least chunk it takes (OCI-Chunk-Min-Length, 0 when
        unsaid); None when the blob was mounted from `source` instead."""
        query = f"?{urllib.parse.urlencode({'mount': digest, 'from': source})}" if source else ""
        response = self.expect(self.request("POST", f"{self.repository_path}/blobs/uploads/{query}"),
                               (201, 202), f"starting the upload of {digest}")
        if response.status == 201:
            return None
        location = response.headers.get("location")
        if not location:
            raise CommandError(f"{self.destination.host} started an upload without a Location")
        least = response.headers.get("oci-chunk-min-length", "")
        return urllib.parse.urljoin(self.base + "/", location), int(least) if least.isdigit() else 0

    def upload(self, location: str, blob: Blob, open_blob: Callable[[], BinaryIO], chunk: int) -> None:
        """The blob into the upload session at `location`: one PUT, or PATCHes of `chunk` bytes and a PUT."""
        octets = {"Content-Type": "application/octet-stream"}
        if blob.size > chunk:
            for offset in range(0, blob.size, chunk):
                length = min(chunk, blob.size - offset)
                response = self.expect(self.request(
                    "PATCH", location, {**octets, "Content-Range": f"{offset}-{offset + length - 1}"},
                    lambda offset=offset, length=length: (_window(open_blob(), offset, length), length)),
                    (202, 204), f"uploading {blob.digest}")
                location = urllib.parse.urljoin(location, response.headers.get("location") or location)
            body: Optional[Body] = None
        else:
            body = lambda: (open_blob(), blob.size)  # noqa: E731
        self.expect(self.request("PUT", _with_query(location, {"digest": blob.digest}), octets, body),
                    (201, 204), f"finishing the upload of {blob.digest}")

    def put_manifest(self, reference: str, document: Document) -> None:
        self.expect(self.request("PUT", f"{self.repository_path}/manifests/{reference}",
                                 {"Content-Type": document.media_type},
                                 lambda: (io.BytesIO(document.data), len(document.data))),
                    (200, 201, 202), f"pushing manifest {document.digest}")


def _window(f: BinaryIO, offset: int, length: int) -> LimitedReader:
    if f.seekable():
        f.seek(offset)
    else:  # a download: read up to the chunk
        while offset:
            skipped = len(f.read(min(offset, SEND_BLOCK)))
            if not skipped:
                raise CommandError("a blob in storage is shorter than its manifest says")
            offset -= skipped
    return LimitedReader(f, length)


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urllib.parse.urlsplit(url)
    query = "&".join(part for part in (parts.query, urllib.parse.urlencode(params)) if part)
    return urllib.parse.urlunsplit(parts._replace(query=query))


class MountHints:
    """Where this machine pushed each blob on one registry, so that a push to another of its
    repositories mounts the blob from there instead of sending it (Docker keeps the same).
    A hint may be stale: a failed mount is answered with an upload session, and used as one."""

    def __init__(self, directory: Path, host: str):
        self.directory = directory
        self.path = directory / f"{hashlib.sha256(host.encode()).hexdigest()}.json"
        try:
            self.known: dict[str, list[str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def sources(self, digest: str, repository: str) -> list[str]:
        return [r for r in self.known.get(digest, []) if r != repository]

    def remember(self, digests: Sequence[str], repository: str) -> None:
        for digest in digests:
            repositories = [repository, *(r for r in self.known.pop(digest, []) if r != repository)]
            self.known[digest] = repositories[:REPOSITORIES_PER_BLOB]
        while len(self.known) > BLOBS_REMEMBERED:
            del self.known[next(iter(self.known))]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.known).encode(), self.directory)
        except OSError as e:
            log.warning("cannot remember pushed blobs", extra={"reason": e.strerror})


@dataclasses.dataclass
class Outcome:
    present: int = 0
    mounted: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0


def push_blob(registry: Registry, image: LocalImage, blob: Blob, sources: Sequence[str], chunk: int,
              outcome: Outcome, lock: threading.Lock) -> None:
    if registry.has_blob(blob.digest):
        with lock:
            outcome.present += 1
        return
    # One mount is tried, from where the blob was pushed last: a registry that declines it
    # answers with an upload session instead, which is used.
    session = registry.start_upload(blob.digest, sources[0] if sources else None)
    if session is None:
        with lock:
            outcome.mounted += 1
        return
    location, least = session
    registry.upload(location, blob, lambda: image.open(blob.digest), max(chunk, least))
    with lock:
        outcome.uploaded += 1
        outcome.bytes_uploaded += blob.size


def push(config: configuration.Config, reference: str, destination: str, *, env: Mapping[str, str],
         platform: Optional[str] = None, oci: bool = False, chunk: int = DEFAULT_CHUNK, jobs: int = DEFAULT_JOBS,
         authfile: Optional[str] = None, insecure: bool = False, mount_from: Sequence[str] = (),
         store: bool = False) -> tuple[Destination, LocalImage, Outcome]:
    target = parse_destination(destination, split_reference(reference)[1])
    for source in mount_from:
        if not images.NAME_RE.fullmatch(source):
            raise CommandError(f"--mount-from {source!r} is not a repository name")
    credential = find(target.host, target.repository, env, authfile)
    hints = MountHints(config.state.pushed, target.host)
    with built(config, reference, OCI_INDEX_MEDIA_TYPE if oci else MANIFEST_LIST_MEDIA_TYPE, platform=platform,
               store=store) as image:
        sources = {blob.digest: list(dict.fromkeys([*mount_from, *hints.sources(blob.digest, target.repository)]))
                   for blob in image.blobs}
        everywhere = list(dict.fromkeys(s for found in sources.values() for s in found))[:MOUNT_SOURCES]
        registry = Registry(target, credential, insecure=insecure, mount_sources=everywhere)
        registry.connect()
        outcome, lock = Outcome(), threading.Lock()
        try:
            with concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="push") as pool:
                futures = [pool.submit(push_blob, registry, image, blob,
                                       [s for s in sources[blob.digest] if s in everywhere], chunk, outcome, lock)
                           for blob in image.blobs]
                for future in futures:
                    future.result()
            if image.top.media_type in ENTRY_MEDIA_TYPES:
                for document in image.manifests:
                    registry.put_manifest(document.digest, document)
            registry.put_manifest(target.tag, image.top)
        except (OSError, http.client.HTTPException) as e:
            raise CommandError(f"pushing to {target.host} failed: {type(e).__name__}: {e}") from None
        hints.remember([blob.digest for blob in image.blobs], target.repository)
        return target, image, outcome


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nixery push",
        description="Builds the image a pull of NAME[:TAG] gives (the same digests, from the same configuration "
                    "variables as the server) and pushes it to a registry; blobs it has already are not sent. "
                    "Credentials are those docker login and skopeo login store.")
    parser.add_argument("reference", metavar="NAME[:TAG]", help="the image, as pulled: shell/git, arm64/hello:v2")
    parser.add_argument("destination", metavar="DESTINATION",
                        help="docker://HOST[:PORT]/REPOSITORY[:TAG] (default tag: the source's)")
    parser.add_argument("--platform", metavar="OS/ARCH[,...]|all",
                        help="platform(s) to build for, among those configured (default: the first, this "
                             "machine's); several, or all, push an index")
    parser.add_argument("--oci", action="store_true",
                        help="push OCI manifests (default: Docker's, as Nixery serves Docker clients)")
    parser.add_argument("--authfile", help="credentials file to read first (skopeo's --authfile)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain HTTP and unverified TLS (a loopback registry may use HTTP without it)")
    parser.add_argument("--mount-from", action="append", default=[], metavar="REPOSITORY",
                        help="a repository of the same registry to mount blobs from (repeatable); those this "
                             "machine pushed elsewhere on it are tried anyway")
    parser.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK, metavar="BYTES",
                        help="blobs up to this size go in one request, bigger ones in requests of it "
                             "(K, M, G or T suffixes; default 64M)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, choices=range(1, 33), metavar="N",
                        help=f"blobs sent at once (1 to 32; default {DEFAULT_JOBS})")
    parser.add_argument("--store", action="store_true",
                        help="also write what is built to the configured storage, as the server would")
    args = parser.parse_args(argv)
    from .cli import run

    def action(config: configuration.Config) -> None:
        target, image, outcome = push(config, args.reference, args.destination, env=os.environ,
                                      platform=args.platform, oci=args.oci, chunk=args.chunk_size, jobs=args.jobs,
                                      authfile=args.authfile, insecure=args.insecure, mount_from=args.mount_from,
                                      store=args.store)
        print(f"nixery push: {image.name}:{image.tag} pushed to {target} as {image.top.digest}: "
              f"{outcome.uploaded} blobs uploaded ({outcome.bytes_uploaded} bytes), {outcome.mounted} mounted, "
              f"{outcome.present} already there ({image.describe()})", file=sys.stderr)
    return run("push", action)


def _size(text: str) -> int:
    size = configuration.parse_size(text)
    if not size:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K, M, G or T)")
    return size
