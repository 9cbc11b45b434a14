"""The Google Cloud Storage backend: one bucket shared by every Nixery instance.

Blobs, layer records and pinned manifests are objects in one bucket, so any
number of instances (and their Gunicorn workers) reuse whatever one of them
built. Clients download blobs straight from GCS: `locate` answers with a V4
signed URL, or with the object's public URL when nothing can sign. HEAD is
answered by Nixery from the object's metadata, since a URL signed for GET
does not serve HEAD.

Who signs (`find_signing`, once at start-up): GCS_SIGNING_KEY when given;
else Application Default Credentials: a service-account key file signs
itself, and any other credentials (the metadata server's account on GKE with
Workload Identity, Compute Engine or Cloud Run, impersonation, a user) ask
IAM's signBlob to sign as their own account or GCS_SIGNING_ACCOUNT, so that
no key file is needed. The start-up check fetches its test object through a
URL made the way blob URLs are: GCS itself says whether they work.

A layer's digest is known only once it has been written, so it streams into
a temporary object (memory stays bounded by one upload chunk) and `commit`
copies that into place with a create-only precondition: a reader sees a
whole, checksummed object at `layers/<digest>` or nothing. Every failure of
the library, the network or the credentials becomes a one-line StorageError,
which the HTTP layer answers with a JSON 503.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.client
import logging
import os
import json
import re
import threading
import time
import uuid
from typing import Iterator, Optional

import requests
import urllib3
import google.auth
from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.auth import crypt, iam
from google.auth import exceptions as auth_exceptions
from google.auth.transport import requests as auth_requests
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions
from google.cloud.storage.fileio import BlobWriter
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from ..config import GcsConfig
from ..recent import Recent
from . import Backend, BlobInfo, Lease, Redirect, StorageError, StoredObject, Upload, check_key

log = logging.getLogger(__name__)

# Unfinished layers live here; a bucket lifecycle rule removes any left by a crash.
TMP_PREFIX = "tmp/"
# The collection lease: an instance that wants it writes a claim here; the earliest claim (by the
# bucket's own creation time) that has not expired holds it. Listings are strongly consistent, so
# of two claims the later one's writer always sees the earlier one.
LEASE_PREFIX = "leases/gc/"
# When the last collection finished, written by the lease's holder.
LEASE_FINISHED = "leases/gc-finished"
# Bytes buffered before a resumable-upload request: the memory one upload holds.
# GCS needs a multiple of 256 KiB; 8 MiB is its recommended minimum for throughput.
CHUNK_SIZE = 8 << 20
_TIMEOUT = (5.0, 60.0)  # connect, read
_TOKEN_URI = "https://oauth2.googleapis.com/token"
# What IAM's signBlob needs of an access token (and the storage scopes include it).
_CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
_REQUEST_PREFIX = re.compile(r"^[A-Z]+ \S+: ")

# Everything google-cloud-storage and its transport raise for a failed request.
_FAILURES = (
    api_exceptions.GoogleAPIError,
    storage_exceptions.InvalidResponse,
    storage_exceptions.DataCorruption,
    auth_exceptions.GoogleAuthError,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)


def _reason(error: BaseException) -> str:
    """A short, one-line account of a failure, without URLs, tokens or key material."""
    if isinstance(error, api_exceptions.RetryError):
        cause = f": {_reason(error.cause)}" if error.cause else ""
        return f"gave up retrying{cause}"
    if isinstance(error, (requests.ConnectionError, urllib3.exceptions.HTTPError, ConnectionError)):
        return "bucket unreachable: cannot connect to Google Cloud Storage"
    if isinstance(error, requests.Timeout):
        return "bucket unreachable: Google Cloud Storage timed out"
    if isinstance(error, storage_exceptions.DataCorruption):
        return "checksum mismatch: the transfer was corrupted"
    if isinstance(error, api_exceptions.NotFound):
        return "404 not found"
    if isinstance(error, api_exceptions.GoogleAPICallError):
        # The library prefixes the request ("GET https://...: "); the reason is what follows.
        return f"{error.code} {_REQUEST_PREFIX.sub('', error.message)}"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, auth_exceptions.GoogleAuthError):
        # google-auth names files and reasons, never the key itself.
        return f"credentials: {text}"
    return text


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_signing_credentials(config: GcsConfig) -> Optional[service_account.Credentials]:
    """Credentials that sign URLs with GCS_SIGNING_KEY, or None when it is not set.

    Read and tried once at start-up, so a bad key stops Nixery there instead of
    failing every blob request. Errors name the file, never its contents.
    """
    if config.signing_key is None or config.signing_account is None:
        return None
    path = config.signing_key
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise StorageError(f"GCS_SIGNING_KEY {path} cannot be read: {e.strerror}") from None
    try:
        signer = crypt.RSASigner.from_string(pem)
        signer.sign(b"nixery start-up check")
    except Exception:  # any parse failure: its message might quote the key, so drop it
        raise StorageError(f"GCS_SIGNING_KEY {path} is not a PEM-encoded RSA private key") from None
    return service_account.Credentials(signer, config.signing_account, _TOKEN_URI)


def _used(blob: storage.Blob) -> float:
    """When an object was last used: its custom time, which `touch` moves on (and a bucket
    lifecycle rule's daysSinceCustomTime reads), else when it was written."""
    return (blob.custom_time or blob.time_created).timestamp()


def _version(blob: storage.Blob) -> str:
    """What an object is now: its content (generation) and its metadata (metageneration: a `touch`)."""
    return f"{blob.generation}:{blob.metageneration}"


def _listed(blob: storage.Blob) -> StoredObject:
    return StoredObject(blob.name, blob.size, _used(blob), _version(blob), blob.content_type)


class _GcsLease(Lease):
    def __init__(self, backend: "GcsBackend", claim: storage.Blob, term: float, previous: float):
        self.backend = backend
        self.claim = claim
        self.term = term
        self.previous = previous

    def renew(self) -> bool:
        """Moves the claim's expiry on; a claim another instance removed as expired is lost."""
        self.claim.metadata = {"expires": str(time.time() + self.term)}
        with self.backend.failures("renew the collection lease"):
            try:
                self.claim.patch(retry=self.backend.retry, timeout=_TIMEOUT)
            except api_exceptions.NotFound:
                return False
        return True

    def finish(self, when: float) -> None:
        with self.backend.failures("record the collection"):
            self.backend._bucket().blob(LEASE_FINISHED).upload_from_string(
                json.dumps({"finished": when}), content_type="application/json", retry=self.backend.retry,
                timeout=_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class Signing:
    """Who signs blob URLs (`account`, named in the logs and in errors), `how` (what the operator
    set up), and the credentials that sign: holding a private key, or (`iam`) whose access token
    asks IAM's signBlob to sign as `account`."""

    account: str
    how: str
    credentials: auth_credentials.Credentials
    iam: bool = False

    def signer(self) -> auth_credentials.Signing:
        """Credentials that `generate_signed_url` signs with. For IAM, google-auth's `iam.Signer`
        (its HTTP session is made here, in the process that uses it: a session must not cross
        Gunicorn's fork), wrapped as the service-account credentials the library signs with."""
        if not self.iam:
            return self.credentials  # type: ignore[return-value]
        signer = iam.Signer(auth_requests.Request(), self.credentials, self.account)
        return service_account.Credentials(signer, self.account, _TOKEN_URI)


def find_signing(config: GcsConfig) -> Optional[Signing]:
    """Who signs blob URLs (see the module's docstring), or None when nothing can: no key and no
    Application Default Credentials (an emulator, a public bucket). Credentials that could only
    sign through IAM but name no account stop start-up with what to set."""
    key = load_signing_credentials(config)
    if key is not None:
        return Signing(key.service_account_email, "GCS_SIGNING_KEY", key)
    try:
        credentials, _ = google.auth.default(scopes=[_CLOUD_PLATFORM])
    except auth_exceptions.DefaultCredentialsError:
        if config.signing_account:
            raise StorageError(f"GCS_SIGNING_ACCOUNT={config.signing_account} is set, but there are no "
                               "Application Default Credentials to ask IAM to sign as it") from None
        return None
    own = credentials.service_account_email if isinstance(credentials, service_account.Credentials) else None
    if own and config.signing_account in (None, own):
        return Signing(own, "the service-account key of Application Default Credentials", credentials)
    kind = type(credentials).__module__.rsplit(".", 1)[-1] + "." + type(credentials).__name__
    account = config.signing_account or _own_account(credentials, kind)
    return Signing(account, f"IAM signBlob with the token of Application Default Credentials ({kind})",
                   credentials, iam=True)


def _own_account(credentials: auth_credentials.Credentials, kind: str) -> str:
    """The service account credentials act as; the metadata server's (Workload Identity, Compute
    Engine) is known once a token is fetched."""
    try:
        credentials.refresh(auth_requests.Request())
    except _FAILURES as e:
        raise StorageError(f"Application Default Credentials ({kind}) cannot get a token: "
                           f"{_one_line(_reason(e))}") from None
    account = getattr(credentials, "service_account_email", None)
    if not account or account == "default":
        raise StorageError(f"Application Default Credentials ({kind}) name no service account to sign blob "
                           "URLs as: set GCS_SIGNING_ACCOUNT (signed through IAM) or GCS_SIGNING_KEY")
    return account


def _info(blob: storage.Blob) -> BlobInfo:
    return BlobInfo(size=blob.size, media_type=blob.content_type or "application/octet-stream")


class _LayerFile:
    """The file a layer is archived into: a resumable upload whose failures are StorageErrors."""

    def __init__(self, backend: "GcsBackend", writer: BlobWriter):
        self.backend = backend
        self.writer = writer

    def write(self, data: bytes) -> int:
        with self.backend.failures("upload a layer"):
            return self.writer.write(data)


class _GcsUpload(Upload):
    def __init__(self, backend: "GcsBackend", tmp: storage.Blob):
        self.backend = backend
        self.tmp = tmp
        self.writer = BlobWriter(tmp, chunk_size=CHUNK_SIZE, retry=backend.retry, timeout=_TIMEOUT)
        self.file = _LayerFile(backend, self.writer)  # type: ignore[assignment]

    def commit(self, key: str, media_type: str) -> None:
        check_key(key)
        with self.backend.failures(f"store {key}"):
            self.writer.close()  # finishes the upload; the library checks its crc32c
            self.backend.publish(self.tmp, key, media_type)

    def discard(self) -> None:
        """Cancels the upload or deletes the temporary object, once, without retrying.

        A failure here only leaves an object under tmp/ that nothing refers to,
        so it is logged rather than raised over the error that led here.
        """
        try:
            if self.writer.closed:
                self.tmp.delete(retry=None, timeout=_TIMEOUT)
            else:
                self.writer.terminate()
        except _FAILURES as e:
            log.warning("could not remove a temporary upload",
                        extra={"object": self.tmp.name, "reason": _one_line(_reason(e))})


class GcsBackend(Backend):
    name = "gcs"

    def __init__(self, config: GcsConfig, mark_every: float = 0.0):
        """`mark_every`: an object this process marked used that long ago or less is not marked again
        (a request each; a quarter of the collector's grace period keeps every use covered)."""
        self.config = config
        self._marked = Recent(mark_every)
        # A registry client waits for the answer, so an unreachable bucket is given up on
        # after GCS_RETRY_SECONDS, not the library's two minutes.
        self.retry = DEFAULT_RETRY.with_timeout(float(config.retry_seconds))
        self.signing = find_signing(config)
        self._lock = threading.Lock()
        self._client: Optional[storage.Client] = None
        self._client_pid = 0
        self._signer: Optional[auth_credentials.Signing] = None
        self._signing_checked = False

    def _bucket(self) -> storage.Bucket:
        """The bucket, through a client made in this process on first use.

        Gunicorn forks its workers, and a client's connections must not be
        shared across a fork; its threads share one client, as the library's
        own transfer manager does. Credentials come from Application Default
        Credentials, or are anonymous when STORAGE_EMULATOR_HOST names an
        emulator (the library decides both).
        """
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                client = storage.Client(project=None)
                self._signer = self.signing.signer() if self.signing else None
                self._client, self._client_pid = client, os.getpid()
            return self._client.bucket(self.config.bucket)

    @contextlib.contextmanager
    def failures(self, action: str) -> Iterator[None]:
        """Turns any failure of GCS while doing `action` into a one-line StorageError."""
        try:
            yield
        except _FAILURES as e:
            reason = _one_line(_reason(e))
            log.warning("gcs request failed", extra={"bucket": self.config.bucket, "action": action,
                                                     "reason": reason})
            raise StorageError(f"GCS bucket {self.config.bucket}: {action} failed: {reason}") from None

    def _get(self, key: str) -> Optional[storage.Blob]:
        return self._bucket().get_blob(check_key(key), retry=self.retry, timeout=_TIMEOUT)

    def stat(self, key: str) -> Optional[BlobInfo]:
        with self.failures(f"stat {key}"):
            blob = self._get(key)
        return _info(blob) if blob else None

    def read(self, key: str) -> Optional[bytes]:
        with self.failures(f"read {key}"):
            try:
                return self._bucket().blob(check_key(key)).download_as_bytes(retry=self.retry, timeout=_TIMEOUT)
            except api_exceptions.NotFound:
                return None

    def write(self, key: str, data: bytes, media_type: str) -> None:
        """Stores a small object in one request (GCS makes it visible whole)."""
        with self.failures(f"write {key}"):
            self._bucket().blob(check_key(key)).upload_from_string(data, content_type=media_type,
                                                                   retry=self.retry, timeout=_TIMEOUT)

    def put_if_absent(self, key: str, data: bytes, media_type: str) -> None:
        """A read first (an object there is left alone without a write, which read-only credentials
        could not make), then a create-only upload (`if_generation_match=0`): of two instances
        writing the same blob at once, GCS keeps the first and refuses the second, changing nothing."""
        with self.failures(f"write {key}"):
            blob = self._bucket().blob(check_key(key))
            if blob.exists(retry=self.retry, timeout=_TIMEOUT):
                return
            with contextlib.suppress(api_exceptions.PreconditionFailed):
                blob.upload_from_string(data, content_type=media_type, if_generation_match=0,
                                        retry=self.retry, timeout=_TIMEOUT)

    @contextlib.contextmanager
    def upload(self) -> Iterator[Upload]:
        with self.failures("start an upload"):
            tmp = self._bucket().blob(f"{TMP_PREFIX}{uuid.uuid4().hex}")
        upload = _GcsUpload(self, tmp)
        try:
            yield upload
        finally:
            upload.discard()

    def publish(self, tmp: storage.Blob, key: str, media_type: str) -> None:
        """Copies a finished temporary object to `key`, unless an object is already there.

        The media type is set on the temporary object first, so the copy
        carries it from its first moment. The copy is server-side and atomic;
        `if_generation_match=0` makes it create-only, so when two instances
        publish the same layer at once, the first wins and the second is a no-op.
        """
        bucket = self._bucket()
        if bucket.get_blob(key, retry=self.retry, timeout=_TIMEOUT) is not None:
            return
        tmp.content_type = media_type
        tmp.patch(retry=self.retry, timeout=_TIMEOUT)
        target = bucket.blob(key)
        token: Optional[str] = None
        with contextlib.suppress(api_exceptions.PreconditionFailed):
            while True:  # large objects may take several rewrite calls
                token, _, _ = target.rewrite(tmp, token=token, if_generation_match=0,
                                             retry=self.retry, timeout=_TIMEOUT)
                if token is None:
                    break

    def locate(self, key: str) -> Optional[Redirect]:
        with self.failures(f"locate {key}"):
            blob = self._get(key)
            if blob is None:
                return None
            return Redirect(self._url(blob), _info(blob))

    def objects(self) -> Iterator[StoredObject]:
        with self.failures("list the bucket"):
            for prefix in ("layers/", "builds/", "manifests/"):
                for blob in self._bucket().list_blobs(prefix=prefix, retry=self.retry, timeout=_TIMEOUT):
                    yield _listed(blob)

    def unchanged(self, listed: StoredObject) -> bool:
        with self.failures(f"stat {listed.key}"):
            blob = self._get(listed.key)
        return blob is not None and _used(blob) <= listed.used and _version(blob) == listed.version

    def delete(self, listed: StoredObject) -> bool:
        """Deletes on the condition that neither the object's content (generation) nor its
        metadata (metageneration: a `touch`) changed since it was listed."""
        generation, metageneration = (int(part) for part in listed.version.split(":"))
        with self.failures(f"delete {listed.key}"):
            try:
                self._bucket().blob(check_key(listed.key)).delete(
                    if_generation_match=generation, if_metageneration_match=metageneration, retry=self.retry,
                    timeout=_TIMEOUT)
            except api_exceptions.PreconditionFailed:
                return False
            except api_exceptions.NotFound:
                pass
        return True

    def touch(self, key: str) -> None:
        if not self._marked.first(key):
            return
        blob = self._bucket().blob(check_key(key))
        blob.custom_time = datetime.datetime.now(datetime.timezone.utc)
        # An outage is logged by `failures` and let go; an absent object has nothing to mark.
        with contextlib.suppress(StorageError), self.failures(f"mark {key} used"), \
                contextlib.suppress(api_exceptions.NotFound):
            blob.patch(retry=self.retry, timeout=_TIMEOUT)

    @contextlib.contextmanager
    def lease(self, term: float) -> Iterator[Optional[Lease]]:
        """Writes a claim, then lists the claims: this one holds the lease if no earlier claim is
        unexpired (expired ones, left by a holder that died, are removed). The claim is removed
        when the block ends."""
        bucket = self._bucket()
        claim = bucket.blob(f"{LEASE_PREFIX}{uuid.uuid4().hex}")
        claim.metadata = {"expires": str(time.time() + term)}
        with self.failures("claim the collection lease"):
            claim.upload_from_string(b"", retry=self.retry, timeout=_TIMEOUT)
        try:
            with self.failures("read the collection lease"):
                held = self._first_claim(bucket) == claim.name
                previous = 0.0
                if held:
                    with contextlib.suppress(api_exceptions.NotFound):  # no collection finished yet
                        previous = json.loads(bucket.blob(LEASE_FINISHED).download_as_bytes(
                            retry=self.retry, timeout=_TIMEOUT))["finished"]
            yield _GcsLease(self, claim, term, float(previous)) if held else None
        finally:
            try:
                claim.delete(retry=self.retry, timeout=_TIMEOUT)
            except _FAILURES as e:  # it expires anyway
                log.warning("could not remove a lease claim", extra={"reason": _one_line(_reason(e))})

    def _first_claim(self, bucket: storage.Bucket) -> Optional[str]:
        now = time.time()
        live = []
        for blob in bucket.list_blobs(prefix=LEASE_PREFIX, retry=self.retry, timeout=_TIMEOUT):
            if float((blob.metadata or {}).get("expires", 0)) > now:
                live.append((blob.time_created, blob.name))
            else:
                with contextlib.suppress(api_exceptions.NotFound, api_exceptions.PreconditionFailed):
                    blob.delete(if_metageneration_match=blob.metageneration, retry=self.retry, timeout=_TIMEOUT)
        return min(live)[1] if live else None

    def _url(self, blob: storage.Blob) -> str:
        """A V4 URL signed for GET when a signer is known, else the public URL.

        Both start with the client's endpoint, which is the emulator's when one is used.
        """
        if self._signer is None:
            return blob.public_url
        return blob.generate_signed_url(
            version="v4", method="GET", credentials=self._signer,
            expiration=datetime.timedelta(seconds=self.config.signed_url_ttl))

    def check(self) -> None:
        """Writes, reads back and deletes one object under tmp/: the smallest requests that prove
        the bucket exists and that this instance may do what a build does in it; the first time in
        a process, the object is also fetched as a client would, through its blob URL.

        (Reading the bucket's own metadata would need more than object access.)
        """
        probe = self._bucket().blob(f"{TMP_PREFIX}check-{uuid.uuid4().hex}")
        with self.failures("writing a test object"):
            probe.upload_from_string(b"nixery", retry=self.retry, timeout=_TIMEOUT)
        try:
            with self.failures("reading a test object back"):
                data = probe.download_as_bytes(retry=self.retry, timeout=_TIMEOUT)
            if data != b"nixery":
                raise StorageError(f"GCS bucket {self.config.bucket}: a test object read back differs from what "
                                   "was written")
            if not self._signing_checked:
                self._check_blob_url(probe)
                self._signing_checked = True
        finally:
            # One that cannot be deleted stays under tmp/, which the lifecycle rule empties.
            with contextlib.suppress(*_FAILURES):
                probe.delete(retry=self.retry, timeout=_TIMEOUT)

    def _check_blob_url(self, probe: storage.Blob) -> None:
        """Fetches `probe` through a URL made as blob URLs are (signed, or public), as a client
        would: GCS itself checks the signature, the account's access and the clock. An error names
        the account and how it signs."""
        who = (f"signed as {self.signing.account} ({self.signing.how})" if self.signing
               else "unsigned (no GCS_SIGNING_KEY and no Application Default Credentials)")
        hint = ("; the account needs roles/iam.serviceAccountTokenCreator on itself to sign through IAM, "
                "and read access to the bucket" if self.signing and self.signing.iam else "")
        try:
            url = self._url(probe)
        except _FAILURES as e:
            raise StorageError(f"GCS bucket {self.config.bucket}: a blob URL {who} cannot be made: "
                               f"{_one_line(_reason(e))}{hint}") from None
        try:
            answer = requests.get(url, timeout=_TIMEOUT)
        except requests.RequestException as e:
            raise StorageError(f"GCS bucket {self.config.bucket}: fetching a test object through its blob URL "
                               f"{who} failed: {_one_line(_reason(e))}") from None
        if answer.status_code != 200 or answer.content != b"nixery":
            raise StorageError(f"GCS bucket {self.config.bucket}: a blob URL {who} was refused: "
                               f"{answer.status_code} {_one_line(answer.text, 200)}{hint}")
        log.info("gcs bucket reachable", extra={
            "bucket": self.config.bucket, "blob_urls": "signed" if self.signing else "public",
            **({"signing_account": self.signing.account, "signing": self.signing.how} if self.signing else {})})
