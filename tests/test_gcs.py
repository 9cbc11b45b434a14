"""The GCS backend against gcp-storage-emulator, with the real google-cloud-storage client.

The emulator runs in its own process and keeps its data on disk, so a test can
stop it (an outage) and start it again on the same port with the bucket intact.
Its request log shows what Nixery and the registry clients asked of GCS.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs

from google_standins import Metadata, SignBlob
from support import NIX_ENV, Server, chroot_run, free_port, oci_manifest, pull_and_unpack
from nixery.archive import LAYER_MEDIA_TYPE, THREADS
from nixery import config
from nixery.config import GcsConfig
from nixery.manifest import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE
from nixery.storage import StorageError
from nixery.storage.filesystem import FilesystemBackend
from nixery.storage.gcs import CHUNK_SIZE, GcsBackend

ACCOUNT = "nixery-signer@nixery-test.iam.gserviceaccount.com"
_REQUEST_LINE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+"')
_UNRESERVED = "-_.~"


class Emulator:
    """gcp-storage-emulator with one bucket, stored on disk under `workdir`."""

    def __init__(self, workdir: Path, bucket: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.bucket = bucket
        self.port = free_port()
        self.log_path = workdir / "emulator.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Emulator":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "-d", str(self.workdir / "data"), "start",
             "--host", "127.0.0.1", "--port", str(self.port), "--default-bucket", self.bucket],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if requests.get(self.url, timeout=1).text == "OK":
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"emulator did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def requests_since(self, offset: int) -> list[tuple[str, str]]:
        """(method, path) of every request the emulator logged after `offset`."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return _REQUEST_LINE.findall(f.read().decode(errors="replace"))

    def objects(self) -> dict[str, gcs.Blob]:
        client = gcs.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": self.url})
        return {blob.name: blob for blob in client.bucket(self.bucket).list_blobs()}


@pytest.fixture
def emulator(tmp_path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "gcs", f"nixery-test-{uuid.uuid4().hex[:8]}").start()
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> tuple[Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("signing") / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


def gcs_env(emulator: Emulator, **extra: str) -> dict[str, str]:
    return {"GCS_BUCKET": emulator.bucket, "STORAGE_EMULATOR_HOST": emulator.url, **extra}


def signing_env(signing_key: tuple[Path, rsa.RSAPrivateKey]) -> dict[str, str]:
    return {"GCS_SIGNING_KEY": str(signing_key[0]), "GCS_SIGNING_ACCOUNT": ACCOUNT}


def verify_signed_url(url: str, public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Rebuilds the V4 string-to-sign from `url` and checks its signature; returns the query.

    Written from the GCS V4 signing documentation, not from the library, so it
    checks the library too: canonical request = method, path, sorted and
    RFC 3986-encoded query without the signature, the host header, the signed
    header names and UNSIGNED-PAYLOAD.
    """
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe=_UNRESERVED)}={urllib.parse.quote(v, safe=_UNRESERVED)}"
                               for k, v in sorted(query.items()))
    assert query["X-Goog-SignedHeaders"] == "host"
    canonical_request = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host",
                                   "UNSIGNED-PAYLOAD"])
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join([query["X-Goog-Algorithm"], query["X-Goog-Date"], scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
    return query


def test_image_is_built_into_the_bucket_pulled_through_signed_urls_and_runs(
        start_server, emulator, pkgset, signing_key, tmp_path):
    server = start_server(gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset), **signing_env(signing_key)))
    offset = emulator.log_offset()
    rootfs = pull_and_unpack(server.host, "shell/hello", tmp_path)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"

    served = requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=60)
    manifest = served.json()
    assert [layer["digest"] for layer in manifest["layers"]] == \
        [layer["digest"] for layer in oci_manifest(tmp_path / "oci")["layers"]]
    objects = emulator.objects()
    for layer in manifest["layers"]:
        blob = objects[f"layers/{layer['digest']}"]
        assert (blob.size, blob.content_type) == (layer["size"], LAYER_MEDIA_TYPE)
    assert objects[f"layers/{manifest['config']['digest']}"].content_type == CONFIG_MEDIA_TYPE
    assert objects[f"layers/{served.headers['Docker-Content-Digest']}"].content_type == MANIFEST_MEDIA_TYPE
    assert len([name for name in objects if name.startswith("builds/")]) == len(manifest["layers"])
    assert not [name for name in objects if name.startswith("tmp/")], "temporary uploads are removed"
    assert not (server.workdir / "storage").exists(), "nothing is stored on the local disk"

    # skopeo fetched every layer from GCS itself, through the signed URLs.
    fetched = {urllib.parse.unquote(path.split("?")[0]) for method, path in emulator.requests_since(offset)
               if method == "GET" and "X-Goog-Signature=" in path}
    assert {f"/{emulator.bucket}/layers/{layer['digest']}" for layer in manifest["layers"]} <= fetched
    key_body = signing_key[0].read_text().splitlines()[1]
    assert key_body not in server.log()


def test_signed_url_verifies_with_the_public_key(start_server, emulator, pkgset, signing_key):
    server = start_server(gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset), **signing_env(signing_key)))
    manifest = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).json()
    layer = manifest["layers"][0]
    blob_url = f"{server.url}/v2/hello/blobs/{layer['digest']}"

    response = requests.get(blob_url, allow_redirects=False, timeout=30)
    assert response.status_code == 307
    url = response.headers["Location"]
    assert url.startswith(f"{emulator.url}/{emulator.bucket}/layers/sha256%3A")
    public_key = signing_key[1].public_key()
    query = verify_signed_url(url, public_key)
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-Expires"] == "300"
    email, date, region, service, request_type = query["X-Goog-Credential"].split("/")
    assert (email, date, region, service, request_type) == (ACCOUNT, query["X-Goog-Date"][:8], "auto",
                                                             "storage", "goog4_request")
    signed_at = datetime.datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - signed_at).total_seconds()) < 60

    # The verifier is not vacuous: a longer expiry or another object breaks the signature.
    for forged in (url.replace("X-Goog-Expires=300", "X-Goog-Expires=3000"),
                   url.replace("layers/sha256%3A", "layers/sha256%3A0", 1)):
        with pytest.raises(InvalidSignature):
            verify_signed_url(forged, public_key)

    body = requests.get(url, timeout=30).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]

    head = requests.head(blob_url, timeout=30)
    assert head.status_code == 200, "HEAD is answered by Nixery, not redirected"
    assert int(head.headers["Content-Length"]) == layer["size"]
    assert head.headers["Docker-Content-Digest"] == layer["digest"]
    assert head.headers["Content-Type"] == LAYER_MEDIA_TYPE


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    """Google's OAuth token endpoint, as far as a service-account key needs it."""

    calls = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        body = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_service_account_key_in_adc_signs_urls(emulator, signing_key, tmp_path, monkeypatch):
    """GOOGLE_APPLICATION_CREDENTIALS naming a service-account JSON key is enough to sign."""
    token_server = http.server.HTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    account = "nixery-adc@nixery-test.iam.gserviceaccount.com"
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "nixery-test", "private_key_id": "1", "client_id": "1",
        "private_key": signing_key[0].read_text(), "client_email": account,
        "token_uri": f"http://127.0.0.1:{token_server.server_port}/token"}))
    # Not the emulator variable: that would make the library use anonymous credentials.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", emulator.url)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    try:
        backend = GcsBackend(GcsConfig(emulator.bucket, None, None, 120, 10))
        backend.check()
        key = "layers/sha256:" + "2" * 64
        backend.write(key, b"signed by adc", "text/plain")
        location = backend.locate(key)
    finally:
        token_server.shutdown()
    assert _TokenHandler.calls >= 1, "the requests carried the service account's token"
    query = verify_signed_url(location.url, signing_key[1].public_key())
    assert query["X-Goog-Credential"].startswith(account + "/")
    assert query["X-Goog-Expires"] == "120"
    assert requests.get(location.url, timeout=30).content == b"signed by adc"


WI_ACCOUNT = "nixery-wi@nixery-test.iam.gserviceaccount.com"


@pytest.fixture
def workload_identity(tmp_path, signing_key) -> Iterator[tuple[Metadata, SignBlob]]:
    """A pod's view of Google under Workload Identity: a metadata server naming WI_ACCOUNT and
    handing out its token, and IAM's signBlob, which signs as WI_ACCOUNT with the test key."""
    metadata = Metadata(WI_ACCOUNT).start()
    iam = SignBlob(WI_ACCOUNT, metadata.token, signing_key[1], tmp_path / "iam").start()
    yield metadata, iam
    iam.stop()
    metadata.stop()


def workload_identity_env(emulator: Emulator, metadata: Metadata, iam: SignBlob, **extra: str) -> dict[str, str]:
    """No key file, no GOOGLE_APPLICATION_CREDENTIALS: google-auth finds the metadata server. The
    emulator is named as an API endpoint (its own variable would make the library anonymous)."""
    return {"GCS_BUCKET": emulator.bucket, "API_ENDPOINT_OVERRIDE": emulator.url, **metadata.env(), **iam.env(),
            **extra}


def test_workload_identity_signs_blob_urls_through_iam_without_a_key(
        start_server, emulator, pkgset, signing_key, workload_identity, tmp_path):
    metadata, iam = workload_identity
    server = start_server(workload_identity_env(emulator, metadata, iam, NIXERY_PKGS_PATH=str(pkgset)))
    [ready] = [e for e in server.log_entries() if e.get("message") == "gcs bucket reachable"]
    assert ready["signing_account"] == WI_ACCOUNT and "IAM signBlob" in ready["signing"], ready
    assert iam.calls, "the start-up check signed through IAM"

    # A real client pulls through the redirects, straight from the bucket.
    rootfs = pull_and_unpack(server.host, "shell/hello", tmp_path)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
    manifest = requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=60).json()
    for layer in manifest["layers"]:
        response = requests.get(f"{server.url}/v2/shell/hello/blobs/{layer['digest']}", allow_redirects=False,
                                timeout=30)
        assert response.status_code == 307
        url = response.headers["Location"]
        query = verify_signed_url(url, signing_key[1].public_key())
        assert query["X-Goog-Credential"].startswith(WI_ACCOUNT + "/")
        body = requests.get(url, timeout=30).content
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
    # Every signature came from IAM, asked with the token the metadata server gave, through HTTPS.
    assert set(iam.calls) == {(WI_ACCOUNT, metadata.token)}
    assert set(iam.tunnels) == {"iamcredentials.googleapis.com:443"}
    assert metadata.tokens_issued >= 1


@pytest.mark.parametrize("case", ["iam refuses", "another account"])
def test_start_up_stops_when_iam_signing_cannot_work(emulator, workload_identity, tmp_path, case):
    """An account without the right to sign as itself (IAM answers 403), or credentials that name
    no account: Nixery stops at start-up, naming the account and what it lacks."""
    metadata, iam = workload_identity
    env = workload_identity_env(emulator, metadata, iam)
    if case == "iam refuses":
        iam.refuse = True
    else:
        env["GCS_SIGNING_ACCOUNT"] = "other@nixery-test.iam.gserviceaccount.com"  # not the one IAM signs as
    server = Server(tmp_path, env)
    result = subprocess.run([sys.executable, "-m", "nixery"], env={**server.env, **NIX_ENV}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    account = WI_ACCOUNT if case == "iam refuses" else env["GCS_SIGNING_ACCOUNT"]
    assert f"signed as {account} (IAM signBlob" in last and "403" in last, last
    assert "roles/iam.serviceAccountTokenCreator" in last, last
    assert metadata.token not in result.stderr


def _pinned_source(pkgset: Path, directory: Path) -> tuple[str, str]:
    """A nixpkgs-like tarball of the package set served under a commit tag: (template, commit)."""
    directory.mkdir()
    commit = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
    subprocess.run(["tar", "czf", str(directory / f"{commit}.tar.gz"), "-C", str(pkgset.parent), pkgset.name],
                   check=True)
    return f"file://{directory}/{{rev}}.tar.gz", commit


def test_second_server_serves_what_the_first_built_without_uploading(
        start_server, emulator, pkgset, nix_counter, tmp_path):
    template, commit = _pinned_source(pkgset, tmp_path / "channel")
    env = gcs_env(emulator, NIXERY_CHANNEL="nixos-unstable", NIXERY_CHANNEL_URL_TEMPLATE=template)
    first = start_server(env)
    built = requests.get(f"{first.url}/v2/shell/hello/manifests/{commit}", timeout=180)
    assert built.status_code == 200, built.text
    objects = emulator.objects()
    assert any(name.startswith("manifests/") for name in objects), "the pinned manifest is in the bucket"
    generations = {name: blob.generation for name, blob in objects.items()}

    second = start_server({**env, "PATH": nix_counter.path()})
    nix_counter.reset()
    offset = emulator.log_offset()
    rootfs = pull_and_unpack(second.host, "shell/hello", tmp_path, tag=commit)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
    assert [layer["digest"] for layer in oci_manifest(tmp_path / "oci", commit)["layers"]] == \
        [layer["digest"] for layer in built.json()["layers"]]
    assert nix_counter.count() == 0, "the pinned manifest came from the bucket"

    changes = [(method, path) for method, path in emulator.requests_since(offset)
               if method not in ("GET", "HEAD")]
    # One metadata write: the pulled manifest marked used (its custom time), for collections.
    manifest_key = urllib.parse.quote(f"layers/{built.headers['Docker-Content-Digest']}", safe="")
    assert [method for method, _ in changes] == ["PATCH"] and manifest_key in changes[0][1], \
        "the second server uploaded nothing"
    assert emulator.objects()[f"layers/{built.headers['Docker-Content-Digest']}"].custom_time is not None
    assert {name: blob.generation for name, blob in emulator.objects().items()} == generations

    # Without a signing key, blobs redirect to their public URL at the client's endpoint.
    layer = built.json()["layers"][0]
    response = requests.get(f"{second.url}/v2/shell/hello/blobs/{layer['digest']}", allow_redirects=False,
                            timeout=30)
    assert response.status_code == 307
    assert response.headers["Location"] == (f"{emulator.url}/{emulator.bucket}/layers/"
                                            f"{urllib.parse.quote(layer['digest'])}")


def _assert_unavailable(response: requests.Response) -> str:
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    [error] = response.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert "\n" not in error["message"] and "GCS bucket" in error["message"]
    return error["message"]


def test_outage_gives_json_errors_and_the_pull_succeeds_after_it(start_server, emulator, pkgset, tmp_path):
    # Two seconds of retries, not the default ten: what the clients get is the same.
    server = start_server(gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset), GCS_RETRY_SECONDS="2"))
    [start_line] = [e for e in server.log_entries() if e.get("message") == "starting nixery"]
    assert start_line["config"]["gcs_retry_seconds"] == 2
    manifest = requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=120).json()

    emulator.stop()  # between the manifest and the blobs of a pull
    layer = manifest["layers"][0]["digest"]
    # A blob and a build during the outage, at once: each is retried for two seconds before its 503.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        blob = pool.submit(requests.get, f"{server.url}/v2/shell/hello/blobs/{layer}", timeout=60)
        build = pool.submit(requests.get, f"{server.url}/v2/shell/greeter/manifests/latest", timeout=120)
        assert "cannot connect" in _assert_unavailable(blob.result())
        _assert_unavailable(build.result())
    # The first layer that failed failed the build: of greeter's ten layers, only those already
    # running on the THREADS archiving threads (or picked up as the first failed) were tried.
    tried = [e for e in server.log_entries() if e.get("message") == "gcs request failed"
             and e["action"].startswith("read builds/")]
    assert 1 <= len(tried) < 2 * THREADS, tried
    assert server.proc.poll() is None
    assert requests.get(f"{server.url}/v2/", timeout=10).status_code == 200

    emulator.start()
    rootfs = pull_and_unpack(server.host, "shell/greeter", tmp_path)
    assert "Hello, world!" in chroot_run(rootfs, "/bin/greeter")
    blobs = list((tmp_path / "oci/blobs/sha256").iterdir())
    assert len(blobs) == len(oci_manifest(tmp_path / "oci")["layers"]) + 2
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert not [name for name in emulator.objects() if name.startswith("tmp/")]


def test_interrupted_upload_leaves_nothing_and_uploads_stream(emulator, monkeypatch):
    """In process: a layer whose upload fails is never visible; memory stays near one chunk."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    # Retried for one second, not the default ten: what fails and what is left over is the same.
    backend = GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 1))
    backend.check()
    key = "layers/sha256:" + "1" * 64

    with pytest.raises(StorageError) as failure:
        with backend.upload() as upload:
            upload.file.write(b"x" * (CHUNK_SIZE + 1))  # one chunk goes out now
            emulator.stop()
            upload.commit(key, LAYER_MEDIA_TYPE)
    assert emulator.bucket in str(failure.value) and "\n" not in str(failure.value)
    emulator.start()
    assert backend.stat(key) is None

    size = 5 * CHUNK_SIZE + 12345
    piece = b"\0" * (1 << 20)
    digest = hashlib.sha256()
    tracemalloc.start()
    with backend.upload() as upload:
        for offset in range(0, size, len(piece)):
            data = piece[: min(len(piece), size - offset)]
            digest.update(data)
            upload.file.write(data)
        upload.commit(key, LAYER_MEDIA_TYPE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"streamed {size >> 20} MiB with a peak of {peak / (1 << 20):.1f} MiB traced")
    assert peak < 3 * CHUNK_SIZE < size

    stored = emulator.objects()[key]
    assert (stored.size, stored.content_type) == (size, LAYER_MEDIA_TYPE)
    assert backend.read(key) is not None and hashlib.sha256(backend.read(key)).digest() == digest.digest()
    assert not [name for name in emulator.objects() if name.startswith("tmp/")]

    # Committing bytes to a key that exists changes nothing.
    with backend.upload() as upload:
        upload.file.write(b"other bytes")
        upload.commit(key, LAYER_MEDIA_TYPE)
    assert emulator.objects()[key].generation == stored.generation


def test_put_if_absent_creates_once_and_leaves_an_object_there_alone(emulator, monkeypatch, tmp_path):
    """The blob writes of a build (config, manifest, OCI form, index, SBOM): the first writer's
    object stays, with its generation, on GCS as on the filesystem. On GCS the write is create-only
    (the emulator ignores preconditions, so a race of two writers is not shown here), and an object
    already there costs one read and no write."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    backend = GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 1))
    key = "layers/sha256:" + "2" * 64
    backend.check()  # the client made, and its bucket read, before counting

    def object_requests(offset: int) -> list[tuple[str, str]]:
        return [(method, path) for method, path in emulator.requests_since(offset) if "/o" in path]

    offset = emulator.log_offset()
    backend.put_if_absent(key, b"first", CONFIG_MEDIA_TYPE)
    writes = [path for method, path in object_requests(offset) if method != "GET"]
    assert len(writes) == 1 and writes[0].endswith("ifGenerationMatch=0"), object_requests(offset)
    stored = emulator.objects()[key]
    offset = emulator.log_offset()
    backend.put_if_absent(key, b"second", MANIFEST_MEDIA_TYPE)
    assert [method for method, _ in object_requests(offset)] == ["GET"], "one read, no write"
    again = emulator.objects()[key]
    assert (again.generation, again.content_type, backend.read(key)) == (stored.generation, CONFIG_MEDIA_TYPE, b"first")

    local = FilesystemBackend(tmp_path / "storage")
    local.put_if_absent(key, b"first", CONFIG_MEDIA_TYPE)
    local.put_if_absent(key, b"second", MANIFEST_MEDIA_TYPE)
    assert (local.read(key), local.stat(key).media_type) == (b"first", CONFIG_MEDIA_TYPE)


@pytest.mark.parametrize("case", ["missing bucket", "bad key"])
def test_start_up_stops_with_a_clear_message(emulator, tmp_path, case):
    env = gcs_env(emulator)
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbA"
    if case == "missing bucket":
        env["GCS_BUCKET"] = "no-such-bucket"
    else:
        key = tmp_path / "bad.pem"
        key.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
        env.update({"GCS_SIGNING_KEY": str(key), "GCS_SIGNING_ACCOUNT": ACCOUNT})
    server = Server(tmp_path, env)
    result = subprocess.run([sys.executable, "-m", "nixery"], env={**server.env, **NIX_ENV}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    if case == "missing bucket":
        assert "GCS bucket no-such-bucket" in last and "not found" in last
    else:
        assert "GCS_SIGNING_KEY" in last and str(key) in last
    assert secret not in result.stderr + result.stdout


def test_retry_seconds_are_read_once_and_checked():
    env = {"HOME": "/root", "GCS_BUCKET": "nixery-test"}
    assert config.load(env).gcs.retry_seconds == 10
    assert config.load({**env, "GCS_RETRY_SECONDS": "3"}).gcs.retry_seconds == 3
    for bad in ("0", "601", "soon"):
        with pytest.raises(config.ConfigError, match="GCS_RETRY_SECONDS"):
            config.load({**env, "GCS_RETRY_SECONDS": bad})
