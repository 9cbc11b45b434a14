"""`nixery build` and `nixery push`: the image a pull gives, without a server.

Real clients judge the results: `docker load` and `docker run` of the archive,
skopeo and umoci of the OCI forms, and distribution (Debian's docker-registry 2.8,
run as a process with a configuration of the test's) receiving pushes, with
htpasswd (Basic) and token logins. What the destination received is counted
from its access log; digests are compared with what a server serves for the
same name and revision.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterator, Optional

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from containers import ensure_dockerd
from pkgset import make_emulated_package_set, make_package_set
from support import NIX_ENV, ROOT, Server, chroot_run, free_port
from test_auth import ISSUER, PASSWORD, SERVICE, USER, TokenService

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def nixery(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m nixery COMMAND...` as a user runs it, with only the test's configuration."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("NIXERY_", "STORAGE_PATH", "GCS_", "BUCKET", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG"))}
    return subprocess.run([sys.executable, "-m", "nixery", *command], capture_output=True, timeout=timeout,
                          env={**clean, **NIX_ENV, "PYTHONPATH": str(ROOT), "NIXERY_LOG_LEVEL": "WARNING", **env})


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stderr.decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pkgset) -> Iterator[Server]:
    started = Server(tmp_path_factory.mktemp("server"), {"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_WORKERS": "1"})
    yield started.start()
    started.stop()


def served(server: Server, name: str, accept: str = MANIFEST_V2) -> requests.Response:
    response = requests.get(f"{server.url}/v2/{name}/manifests/latest", headers={"Accept": accept}, timeout=300)
    assert response.status_code == 200, response.text
    return response


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------ build --

def test_build_writes_a_docker_archive_that_loads_and_runs_with_the_servers_digests(server, pkgset, tmp_path):
    ensure_dockerd()
    storage = tmp_path / "storage"  # configured, never made: the build writes nothing there
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(storage), "NIXERY_STATE_DIR": str(tmp_path / "state")}
    archive = tmp_path / "hello.tar"
    told = ok(nixery(["build", "shell/hello", "-o", str(archive)], env))
    assert not storage.exists()
    expected = served(server, "shell/hello")
    config_digest = expected.json()["config"]["digest"]
    assert expected.headers["Docker-Content-Digest"] in told

    with tarfile.open(archive) as tar:
        members = tar.getnames()
        for member in tar.getmembers():
            if member.name.startswith("blobs/sha256/") and member.isfile():
                data = tar.extractfile(member).read()
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1], member.name
        manifest = tar.extractfile(f"blobs/sha256/{expected.headers['Docker-Content-Digest'][7:]}").read()
    assert manifest == expected.content
    assert "manifest.json" in members and "index.json" in members

    loaded = subprocess.run(["docker", "load", "-i", str(archive)], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert "shell/hello:latest" in loaded.stdout
    try:
        image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", "shell/hello:latest"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert image_id == config_digest
        ran = subprocess.run(["docker", "run", "--rm", "shell/hello:latest", "hello"], capture_output=True,
                             text=True, timeout=120)
        assert ran.stdout == "Hello, world!\n", ran.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", config_digest], capture_output=True, timeout=120)

    # Streamed to standard output, the archive is the same bytes.
    streamed = nixery(["build", "shell/hello", "-o", "-"], env)
    assert streamed.returncode == 0 and streamed.stdout == archive.read_bytes()


def test_build_reuses_the_configured_storage_and_writes_there_only_when_asked(server, pkgset, tmp_path):
    served(server, "shell/hello")
    stored = server.workdir / "storage"
    before = files_of(stored)
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(stored), "NIXERY_STATE_DIR": str(tmp_path / "state")}
    told = ok(nixery(["build", "shell/hello", "-o", str(tmp_path / "a.tar")], env))
    # Every layer the server made is found again (or its whole stored manifest).
    assert re.search(r"\(its stored manifest reused\)|\(0 layers built, [1-9]\d* reused from storage\)", told), told
    # A name the server has not built: its layers are found by their records, and only the new ones built.
    told = ok(nixery(["build", "shell/hello/greeter", "-o", str(tmp_path / "b.tar")], env))
    reused = re.search(r"(\d+) layers built, (\d+) reused from storage", told)
    assert reused and int(reused.group(2)) > 0 and int(reused.group(1)) > 0, told
    assert files_of(stored) == before

    # --store writes what it built, as the server would: the server then serves it from there.
    ok(nixery(["build", "shell/hello/greeter", "--store", "-o", str(tmp_path / "c.tar")], env))
    assert set(files_of(stored)) > set(before)
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "c.tar").read_bytes()


def test_build_writes_oci_archives_and_layouts_that_skopeo_and_umoci_read(server, pkgset, tmp_path):
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state")}
    expected = served(server, "shell/hello", OCI_MANIFEST)
    layout = tmp_path / "layout"
    ok(nixery(["build", "shell/hello", "--format", "oci", "-o", str(layout)], env))
    ok(nixery(["build", "shell/hello:latest", "--format", "oci", "-o", str(layout)], env))  # again: one entry
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [expected.headers["Docker-Content-Digest"]]
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(tmp_path / "bundle")], check=True,
                   capture_output=True, timeout=300)
    assert chroot_run(tmp_path / "bundle" / "rootfs", "hello") == "Hello, world!\n"

    ok(nixery(["build", "shell/hello", "--format", "oci-archive", "-o", str(tmp_path / "oci.tar")], env))
    ok(nixery(["build", "shell/hello", "-o", str(tmp_path / "docker.tar")], env))
    # A Docker archive is an OCI archive too (as Docker 25's `docker save` writes).
    for reference in (f"oci-archive:{tmp_path / 'oci.tar'}:latest", f"oci-archive:{tmp_path / 'docker.tar'}:latest",
                      f"docker-archive:{tmp_path / 'docker.tar'}"):
        inspected = subprocess.run(["skopeo", "inspect", "--raw", reference], capture_output=True, timeout=120)
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["config"]["digest"] == expected.json()["config"]["digest"]


def test_build_refuses_bad_names_and_unknown_packages_in_one_line(pkgset, tmp_path):
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state")}
    for reference, message in (("Shell/Hello", "is not an image name"), ("hello:bad/tag", "is not an image name"),
                               ("shell/hellp", "unknown packages: hellp (did you mean hello?)")):
        result = nixery(["build", reference, "-o", str(tmp_path / "x.tar")], env)
        assert result.returncode == 1
        assert message in result.stderr.decode() and "Traceback" not in result.stderr.decode()
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()
    bad = nixery(["build", "hello", "-o", str(tmp_path / "x.tar")], {**env, "NIXERY_LAYER_BUDGET": "many"})
    assert bad.returncode == 2 and b"NIXERY_LAYER_BUDGET" in bad.stderr
    # A misspelt variable would leave its default in place (here: another package set), as on the server.
    typo = nixery(["build", "hello", "-o", str(tmp_path / "x.tar")], {**env, "NIXERY_PKG_PATH": str(pkgset)})
    assert typo.returncode == 2 and b"NIXERY_PKG_PATH is not a Nixery variable; did you mean NIXERY_PKGS_PATH?" \
        in typo.stderr
    assert not (tmp_path / "x.tar").exists()


def test_build_and_push_for_every_platform_give_the_servers_index(registry, pkgset, tmp_path):
    emulated = make_emulated_package_set(tmp_path / "emulated", pkgset)
    env = {"NIXERY_PKGS_PATH": str(emulated), "NIX_CONFIG": NIX_ENV["NIX_CONFIG"] + "\nextra-platforms = aarch64-linux",
           "NIXERY_PLATFORMS": "linux/amd64,linux/arm64"}
    other = Server(tmp_path / "server", {**env, "NIXERY_WORKERS": "1"})
    (tmp_path / "server").mkdir()
    try:
        index = served(other.start(), "shell/hello", f"{OCI_INDEX}, {OCI_MANIFEST}")
        docker_list = served(other, "shell/hello", f"{MANIFEST_LIST}, {MANIFEST_V2}")
    finally:
        other.stop()
    cli = {**env, "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_STATE_DIR": str(tmp_path / "state")}
    layout = tmp_path / "layout"
    ok(nixery(["build", "shell/hello", "--platform", "all", "--format", "oci", "-o", str(layout)], cli))
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["digest"] == index.headers["Docker-Content-Digest"] and entry["mediaType"] == OCI_INDEX
    arm = tmp_path / "arm"
    ok(nixery(["build", "shell/hello", "--platform", "linux/arm64", "--format", "oci", "-o", str(arm)], cli))
    (entry,) = json.loads((arm / "index.json").read_text())["manifests"]
    assert entry["digest"] == index.json()["manifests"][1]["digest"]
    refused = nixery(["build", "shell/hello", "--platform", "all", "-o", str(tmp_path / "x.tar")], cli)
    assert refused.returncode == 1 and b"a Docker archive holds one platform" in refused.stderr
    unknown = nixery(["build", "shell/hello", "--platform", "linux/s390x", "-o", str(tmp_path / "x.tar")], cli)
    assert unknown.returncode == 1 and b"offers linux/amd64, linux/arm64" in unknown.stderr

    # Pushed, the manifest list a Docker client gets from the server (each platform's manifest first).
    ok(nixery(["push", "shell/hello", "--platform", "all", f"{registry.host}/multi:1"], {**cli, "HOME": str(tmp_path)}))
    listed = requests.get(f"http://{registry.host}/v2/multi/manifests/1", headers={"Accept": MANIFEST_LIST}, timeout=60)
    assert listed.headers["Content-Type"] == MANIFEST_LIST and listed.content == docker_list.content


# ------------------------------------------------------------------------------- push --

class Distribution:
    """Debian's docker-registry (distribution 2.8) as a process with a configuration of its own."""

    def __init__(self, root: Path, auth: Optional[dict] = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = root / "registry.log"
        config = {"version": 0.1, "log": {"level": "info", "formatter": "text"},
                  "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                  "http": {"addr": f"127.0.0.1:{self.port}"}}
        if auth:
            config["auth"] = auth
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        # Its access log (one line per request, the combined format) goes to standard output.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(200):
            try:
                requests.get(f"http://127.0.0.1:{self.port}/v2/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(self.log_path.read_text())

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path, status) of each request in its access log, from the `since`th on."""
        found = re.findall(r'"([A-Z]+) (/v2/\S*) HTTP/1\.1" (\d+)', self.log_path.read_text())
        return [(method, urllib.parse.unquote(path), int(status)) for method, path, status in found][since:]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def uploaded(requests_: list[tuple[str, str, int]]) -> list[str]:
    """The digests of the blobs whose uploads were finished (a PUT with ?digest=)."""
    return [re.search(r"digest=(sha256:[0-9a-f]{64})", path).group(1) for method, path, status in requests_
            if method == "PUT" and "/blobs/uploads/" in path and status == 201]


def blobs_of(manifest: dict) -> set[str]:
    return {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def pulled_manifest(registry: Distribution, repository: str, tag: str, auth=None) -> dict:
    response = requests.get(f"http://{registry.host}/v2/{repository}/manifests/{tag}", auth=auth,
                            headers={"Accept": MANIFEST_V2}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Distribution]:
    started = Distribution(tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


def test_push_then_docker_pull_runs_and_a_related_push_sends_only_what_is_missing(server, registry, pkgset,
                                                                                   tmp_path):
    ensure_dockerd()
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    mark = len(registry.requests())  # the registry is the module's: other tests push to it too
    told = ok(nixery(["push", "shell/hello", f"docker://{registry.host}/hello:1"], env))
    first = pulled_manifest(registry, "hello", "1")
    assert json.dumps(first, sort_keys=True) == json.dumps(served(server, "shell/hello").json(), sort_keys=True)
    assert sorted(uploaded(registry.requests(mark))) == sorted(blobs_of(first))
    assert f"{len(blobs_of(first))} blobs uploaded" in told

    reference = f"{registry.host}/hello:1"
    try:
        pulled = subprocess.run(["docker", "pull", "-q", reference], capture_output=True, text=True, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        ran = subprocess.run(["docker", "run", "--rm", reference, "hello"], capture_output=True, text=True,
                             timeout=120)
        assert ran.stdout == "Hello, world!\n", ran.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", reference], capture_output=True, timeout=120)

    # A related image into the same repository: only the blobs the destination lacks are sent.
    mark = len(registry.requests())
    ok(nixery(["push", "shell/hello/greeter", f"docker://{registry.host}/hello:2"], env))
    second = pulled_manifest(registry, "hello", "2")
    sent = uploaded(registry.requests(mark))
    assert sorted(sent) == sorted(blobs_of(second) - blobs_of(first))
    assert 0 < len(sent) < len(blobs_of(second))

    # Into another repository: what this machine pushed to `hello` is mounted from there, not sent.
    mark = len(registry.requests())
    told = ok(nixery(["push", "shell/hello/greeter", f"docker://{registry.host}/greeter:1"], env))
    after = registry.requests(mark)
    assert uploaded(after) == []
    mounts = [path for method, path, status in after if method == "POST" and "mount=" in path and status == 201]
    assert len(mounts) == len(blobs_of(second)) and all("from=hello" in path for path in mounts)
    assert f"{len(blobs_of(second))} mounted" in told
    assert pulled_manifest(registry, "greeter", "1") == second


def test_push_in_chunks_to_a_fresh_repository(registry, pkgset, tmp_path):
    """Without anything remembered (another state directory), every blob goes up; the big ones in
    PATCHes of the chunk size, which distribution checks against the digest at the end."""
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    mark = len(registry.requests())
    ok(nixery(["push", "shell/hello", f"{registry.host}/chunked", "--chunk-size", "64K", "--jobs", "2"], env))
    manifest = pulled_manifest(registry, "chunked", "latest")
    after = registry.requests(mark)
    assert sorted(uploaded(after)) == sorted(blobs_of(manifest))
    patches = [path for method, path, status in after if method == "PATCH" and status == 202]
    big = sum(-(-layer["size"] // (64 << 10)) for layer in manifest["layers"] if layer["size"] > 64 << 10)
    assert big > 1 and len(patches) == big


def test_push_logs_in_with_the_credentials_docker_and_skopeo_keep(pkgset, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-bBc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True)
    registry = Distribution(tmp_path / "registry", {"htpasswd": {"realm": "test", "path": str(htpasswd)}})
    try:
        env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
               "NIXERY_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}
        refused = nixery(["push", "shell/hello", f"{registry.host}/hello:1"], env)
        assert refused.returncode == 1 and b"none are stored for it" in refused.stderr

        # docker login's file: auths keyed by the registry, user:password in base64.
        docker = tmp_path / "home" / ".docker"
        docker.mkdir(parents=True)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        told = ok(nixery(["push", "shell/hello", f"{registry.host}/hello:1"], env))
        assert PASSWORD not in told
        assert pulled_manifest(registry, "hello", "1", auth=(USER, PASSWORD))["layers"]

        # skopeo login's file, named by REGISTRY_AUTH_FILE, comes first: a wrong password there is refused.
        wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
        authfile = tmp_path / "auth.json"
        authfile.write_text(json.dumps({"auths": {f"{registry.host}/hello": {"auth": wrong}}}))
        refused = nixery(["push", "shell/hello", f"{registry.host}/hello:2"], {**env, "REGISTRY_AUTH_FILE": str(authfile)})
        assert refused.returncode == 1 and b"refused the login" in refused.stderr
        assert b"wrong" not in refused.stderr
        # ... and a repository-scoped entry for another repository does not apply.
        ok(nixery(["push", "shell/hello", f"{registry.host}/other:1"], {**env, "REGISTRY_AUTH_FILE": str(authfile)}))
    finally:
        registry.stop()


class X5cTokenService(TokenService):
    """tests/test_auth.py's token service, its tokens carrying their signer's certificate (the
    x5c header), self-signed and given to distribution as its root bundle: distribution 2.8
    trusts a token by its certificate chain."""

    def __init__(self, directory: Path):
        super().__init__(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.signing_key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.signing_key, hashes.SHA256()))
        self.bundle = directory / "token-cert.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def token(self, access: list[dict], subject: str = USER, **claims) -> str:
        claims = jwt.decode(super().token(access, subject, **claims), options={"verify_signature": False})
        der = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        return jwt.encode(claims, self.signing_key, algorithm="RS256", headers={"x5c": [der]})


def test_push_follows_the_token_challenge_with_the_stored_login(pkgset, tmp_path):
    service = X5cTokenService(tmp_path)
    registry = Distribution(tmp_path / "registry", {"token": {
        "realm": service.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(service.bundle)}})
    try:
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (home / ".docker" / "config.json").write_text(json.dumps({"auths": {f"http://{registry.host}/v1/": {"auth": auth}}}))
        env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
               "NIXERY_STATE_DIR": str(tmp_path / "state"), "HOME": str(home)}
        ok(nixery(["push", "shell/hello", f"{registry.host}/team/hello:1"], env))
        assert {"user": USER, "scope": ["repository:team/hello:pull,push"],
                "access": [{"type": "repository", "name": "team/hello", "actions": ["pull", "push"]}]} in service.issued
        # The next push to another repository asks to read the first, and mounts from it.
        mark = len(registry.requests())
        told = ok(nixery(["push", "shell/hello", f"{registry.host}/team/copy:1"], env))
        assert service.issued[-1]["scope"] == ["repository:team/copy:pull,push", "repository:team/hello:pull"]
        assert uploaded(registry.requests(mark)) == [] and " 0 blobs uploaded" in told.replace(":", "")

        # Without a login the token grants nothing, and the push says so.
        (home / ".docker" / "config.json").unlink()
        refused = nixery(["push", "shell/hello", f"{registry.host}/team/hello:2"], env)
        assert refused.returncode == 1 and b"refused the login" in refused.stderr, refused.stderr
    finally:
        registry.stop()
        service.httpd.shutdown()


def test_push_refuses_bad_destinations(pkgset, tmp_path):
    env = {"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    for destination in ("hello", "docker://hello:1", "127.0.0.1:1/Bad", "127.0.0.1:1/a@sha256:00",
                        "127.0.0.1:1/a:b/c:d e"):
        result = nixery(["push", "hello", destination], env)
        assert result.returncode == 1 and b"is not a destination" in result.stderr, (destination, result.stderr)
    closed = nixery(["push", "hello", f"127.0.0.1:{free_port()}/hello"], env)
    assert closed.returncode == 1 and b"cannot reach" in closed.stderr, closed.stderr


def test_build_reads_a_buckets_blobs_and_writes_nothing_there(pkgset, tmp_path):
    """With GCS storage, the layers a server put in the bucket are read through the URLs the
    backend hands out (signed here, as a deployment's are), and checked against their digests."""
    from test_gcs import Emulator, gcs_env, signing_env
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = tmp_path / "signing.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    emulator = Emulator(tmp_path / "gcs", f"nixery-test-{uuid.uuid4().hex[:8]}").start()
    env = gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset), **signing_env((key_path, key)))
    other = Server(tmp_path / "server", env)
    (tmp_path / "server").mkdir()
    try:
        try:
            expected = served(other.start(), "shell/hello")
        finally:
            other.stop()
        before = set(emulator.objects())
        offset = emulator.log_offset()
        archive = tmp_path / "hello.tar"
        told = ok(nixery(["build", "shell/hello", "-o", str(archive)], {**env, "NIXERY_STATE_DIR": str(tmp_path / "s")}))
        assert re.search(r"\(its stored manifest reused\)|\(0 layers built, [1-9]\d* reused from storage\)", told), told
        assert set(emulator.objects()) == before
        fetched = [path for method, path in emulator.requests_since(offset)
                   if method == "GET" and "X-Goog-Signature=" in path]
        assert len(fetched) == len(expected.json()["layers"]) + 1  # every layer and the config
        with tarfile.open(archive) as tar:
            digest = expected.headers["Docker-Content-Digest"]
            assert tar.extractfile(f"blobs/sha256/{digest[7:]}").read() == expected.content
    finally:
        emulator.stop()


def test_build_of_a_declared_image_runs_its_declared_command(tmp_path):
    """A name the package set declares (nixery-images.nix) is built as declared, as a pull of it
    gives it: the same digest, and `docker run` without a command runs the declared one."""
    ensure_dockerd()
    pkgs = make_package_set(tmp_path / "pkgs")
    (pkgs / "nixery-images.nix").write_text(
        '{ ... }: { greet = { packages = [ "hello" ]; Cmd = [ "hello" ]; Env = { GREETING = "hi"; };'
        ' WorkingDir = "/tmp"; User = "nonroot"; }; }\n')
    other = Server(tmp_path / "server", {"NIXERY_PKGS_PATH": str(pkgs), "NIXERY_WORKERS": "1"})
    (tmp_path / "server").mkdir()
    try:
        expected = served(other.start(), "greet")
    finally:
        other.stop()
    archive = tmp_path / "greet.tar"
    env = {"NIXERY_PKGS_PATH": str(pkgs), "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state")}
    assert expected.headers["Docker-Content-Digest"] in ok(nixery(["build", "greet:latest", "-o", str(archive)], env))
    loaded = subprocess.run(["docker", "load", "-i", str(archive)], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    config_digest = expected.json()["config"]["digest"]
    try:
        inspected = json.loads(subprocess.run(["docker", "image", "inspect", "greet:latest"], capture_output=True,
                                              text=True, check=True).stdout)[0]
        assert inspected["Id"] == config_digest
        assert inspected["Config"]["Cmd"] == ["hello"] and "GREETING=hi" in inspected["Config"]["Env"]
        ran = subprocess.run(["docker", "run", "--rm", "greet:latest"], capture_output=True, text=True, timeout=120)
        assert ran.stdout == "Hello, world!\n", ran.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", config_digest], capture_output=True, timeout=120)
