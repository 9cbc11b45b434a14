"""Pull authentication: htpasswd logins, the Docker token flow, and the `build` level, with real clients.

Servers run as users run them (`python -m nixery` under Gunicorn); skopeo logs
in with `--src-creds`, follows the token flow against a small token service
that this module serves, and the images it pulls run in a chroot. Every
server's log, and every response this module reads, is checked at the end for
the password.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.server
import json
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterator

import bcrypt
import falcon
import falcon.testing
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pkgset import make_package_set
from support import NixCounter, Server, chroot_run, oci_manifest, pull_and_unpack, skopeo_pull
from nixery import config, error_handlers, routes
from nixery.api import no_such_endpoint
from nixery.auth import AuthMiddleware
from nixery.config import StateLayout
from nixery.lockout import CAPACITY, FailedLogins
from nixery.routes import RegistryRouter

USER = "alice"
PASSWORD = f"pw-{uuid.uuid4().hex}"
CREDS = f"{USER}:{PASSWORD}"
SERVICE = "nixery-test"
ISSUER = "test-token-service"
SERVERS: list[Server] = []
SEEN: list[str] = []  # every response this module read: headers and body


def seen(response: requests.Response) -> requests.Response:
    SEEN.append(json.dumps(dict(response.headers)) + response.text)
    return response


def get(url: str, **kwargs) -> requests.Response:
    return seen(requests.get(url, timeout=120, **kwargs))


def error_of(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    [error] = response.json()["errors"]
    return error


def start(workdir: Path, env: dict[str, str]) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(workdir, env)
    SERVERS.append(server)
    return server.start()


def write_htpasswd(path: Path, *users: tuple[str, str]) -> Path:
    for number, (user, password) in enumerate(users):
        subprocess.run(["htpasswd", "-bB" + ("c" if number == 0 else ""), str(path), user, password],
                       check=True, capture_output=True)
    return path


def pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module", autouse=True)
def stop_servers() -> Iterator[None]:
    yield
    for server in SERVERS:
        server.stop()


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory) -> Path:
    return write_htpasswd(tmp_path_factory.mktemp("htpasswd") / "htpasswd", (USER, PASSWORD), ("bob", "bobs-pw"))


@pytest.fixture(scope="module")
def private_server(tmp_path_factory, pkgset, htpasswd) -> Server:
    """NIXERY_HTPASSWD alone: level `all`."""
    return start(tmp_path_factory.mktemp("private"), {"NIXERY_PKGS_PATH": str(pkgset),
                                                       "NIXERY_HTPASSWD": str(htpasswd)})


# ------------------------------------------------------------------ htpasswd, level all --

def test_anonymous_requests_get_the_basic_challenge(private_server):
    for path in ("/v2/", "/v2/hello/manifests/latest", "/v2/hello/blobs/sha256:" + "0" * 64, "/v2/_catalog"):
        for method in ("GET", "HEAD"):
            response = seen(requests.request(method, private_server.url + path, timeout=30))
            assert response.status_code == 401, (method, path)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="Nixery"'
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            if method == "GET":
                assert error_of(response)["code"] == "UNAUTHORIZED"
    # The empty credentials skopeo sends when it has none are anonymous, not a failed login.
    assert get(private_server.url + "/v2/hello/manifests/latest", auth=("", "")).status_code == 401
    # The page is not behind the login.
    assert get(private_server.url + "/").status_code == 200


def test_skopeo_logs_in_pulls_and_the_image_runs(private_server, tmp_path):
    rootfs = pull_and_unpack(private_server.host, "shell/hello", tmp_path, creds=CREDS)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
    assert chroot_run(rootfs, "/bin/sh", "-c", "echo $((6 * 7))") == "42\n"
    assert get(private_server.url + "/v2/", auth=(USER, PASSWORD)).status_code == 200
    anonymous = skopeo_pull(private_server.host, "shell/hello", tmp_path / "anonymous")
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()


def test_wrong_passwords_and_users_are_401_and_logged_without_the_password(private_server, tmp_path):
    wrong = skopeo_pull(private_server.host, "hello", tmp_path / "wrong", creds=f"{USER}:not-{PASSWORD}")
    assert wrong.returncode != 0 and "unauthorized" in wrong.stderr.lower()
    answers = [get(private_server.url + "/v2/hello/manifests/latest", auth=auth)
               for auth in ((USER, "nope"), ("mallory", PASSWORD), ("bob", PASSWORD))]
    assert [r.status_code for r in answers] == [401, 401, 401]
    # An unknown user and a wrong password look alike to the client.
    assert len({r.text for r in answers}) == 1 and error_of(answers[0])["code"] == "UNAUTHORIZED"
    assert {r.headers["WWW-Authenticate"] for r in answers} == {'Basic realm="Nixery"'}
    malformed = get(private_server.url + "/v2/", headers={"Authorization": "Basic !!!"})
    assert malformed.status_code == 401
    failed = [e for e in private_server.log_entries() if e.get("message") == "login failed"]
    assert {(e["user"], e["reason"]) for e in failed} >= {
        (USER, "wrong password"), ("mallory", "unknown user"), ("bob", "wrong password"),
        ("", "malformed basic credentials")}
    assert {e["client"] for e in failed} == {"127.0.0.1"}


def test_failed_logins_from_one_address_are_slowed(private_server):
    # 0.05 s, doubling, whichever worker answers (the counts are shared; the cap and the whole
    # sequence are checked in process, below, without waiting them out).
    session = requests.Session()
    url = f"{private_server.url}/v2/hello/manifests/latest"
    took = []
    for _ in range(4):
        started = time.monotonic()
        assert seen(session.get(url, auth=("carol", "guess"), timeout=30)).status_code == 401
        took.append(time.monotonic() - started)
    assert took[3] >= 0.35, took
    # A login from the same address resets the count.
    assert seen(session.get(private_server.url + "/v2/", auth=(USER, PASSWORD), timeout=30)).status_code == 200
    started = time.monotonic()
    assert seen(session.get(url, auth=("carol", "guess"), timeout=30)).status_code == 401
    assert time.monotonic() - started < 0.5


def test_page_says_how_to_log_in_and_shows_no_secret(private_server, htpasswd):
    page = get(private_server.url + "/").text
    assert "Every pull needs a login" in page
    assert f"docker login {private_server.host}" in page
    assert "private: every pull needs a login" in page
    hashes = [line.split(":", 1)[1] for line in htpasswd.read_text().splitlines()]
    assert PASSWORD not in page and not any(h in page for h in hashes)
    # What a private instance has built (shell/hello, by an earlier test) is for those who may pull.
    assert "recent builds and errors are not listed" in page and "shell/hello" not in page
    assert get(private_server.url + "/builds.json").status_code == 403
    # So are the images its package set declares.
    assert get(private_server.url + "/declared.json").status_code == 403 and 'id="declared"' not in page
    [start_line] = [e for e in private_server.log_entries() if e.get("message") == "starting nixery"]
    assert start_line["config"]["auth"] == {"level": "all", "htpasswd_users": 2, "token_realm": None,
                                            "token_service": None, "token_issuer": None}
    assert not any(h in private_server.log() for h in hashes)


# ------------------------------------------------------------------------ level build --

@pytest.fixture(scope="module")
def pinned_repo(tmp_path_factory) -> str:
    """A git repository of the test package set: its images are pinned, so built ones are cached."""
    root = tmp_path_factory.mktemp("repo")
    work = make_package_set(root / "work")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "packages"]):
        subprocess.run(["git", "-C", str(work), "-c", "user.name=test", "-c", "user.email=test@example.com",
                        *args], check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "packages.git")], check=True)
    return f"file://{root / 'packages.git'}"


def test_build_level_serves_built_images_to_all_and_builds_only_for_users(
        tmp_path_factory, pinned_repo, htpasswd, tmp_path):
    counter = NixCounter(tmp_path / "nix")
    server = start(tmp_path_factory.mktemp("build-level"), {
        "NIXERY_PKGS_REPO": pinned_repo, "NIXERY_HTPASSWD": str(htpasswd), "NIXERY_AUTH": "build",
        "PATH": counter.path()})
    counter.reset()  # the start-up check's trivial build
    ping = get(server.url + "/v2/")
    assert ping.status_code == 401 and ping.headers["WWW-Authenticate"] == 'Basic realm="Nixery"'

    # Nobody has built hello yet: an anonymous pull is refused before Nix runs.
    refused = get(f"{server.url}/v2/hello/manifests/latest")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Basic realm="Nixery"'
    assert error_of(refused)["code"] == "UNAUTHORIZED" and "build" in error_of(refused)["message"]
    assert counter.count() == 0

    for directory in ("user", "anonymous"):
        (tmp_path / directory).mkdir()
    # A user builds it...
    built = pull_and_unpack(server.host, "hello", tmp_path / "user", creds=CREDS)
    assert chroot_run(built, "/bin/hello") == "Hello, world!\n"
    builds = counter.count("nix-store")
    assert builds == 1

    # ...and then anyone pulls it, from the cache, with skopeo and with plain requests.
    anonymous = pull_and_unpack(server.host, "hello", tmp_path / "anonymous")
    assert chroot_run(anonymous, "/bin/hello") == "Hello, world!\n"
    assert oci_manifest(tmp_path / "anonymous/oci") == oci_manifest(tmp_path / "user/oci")
    manifest = get(f"{server.url}/v2/hello/manifests/latest")
    assert manifest.status_code == 200
    layer = manifest.json()["layers"][0]
    blob = get(f"{server.url}/v2/hello/blobs/{layer['digest']}")
    assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == layer["digest"]

    # An image nobody built is still refused to anonymous clients, and wrong credentials never
    # pass for anonymous ones, even for a built image.
    new = skopeo_pull(server.host, "shell/hello", tmp_path / "new")
    assert new.returncode != 0 and "unauthorized" in new.stderr.lower()
    wrong = get(f"{server.url}/v2/hello/manifests/latest", auth=(USER, "wrong"))
    assert wrong.status_code == 401
    assert counter.count("nix-store") == builds

    page = get(server.url + "/").text
    assert "Images that are already built can be pulled without logging in" in page
    assert "<code>hello:latest</code>" in page, "at level build the page lists what anyone may pull"
    builds = get(server.url + "/builds.json").json()
    assert [(b["image"], b["outcome"]) for b in builds["builds"]] == [("hello", "built")]
    assert builds["errors"] == [], "refused builds are not build errors"
    assert f"docker login {server.host}" in page


def test_anonymous_pulls_queued_behind_a_users_build_get_its_image(
        tmp_path_factory, fresh_pkgset, htpasswd, tmp_path):
    counter = NixCounter(tmp_path / "nix")
    server = start(tmp_path_factory.mktemp("queued"), {
        "NIXERY_PKGS_PATH": str(fresh_pkgset), "NIXERY_HTPASSWD": str(htpasswd), "NIXERY_AUTH": "build",
        "PATH": counter.path()})
    counter.reset()  # the start-up check's trivial build
    url = f"{server.url}/v2/slowbuild/manifests/latest"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        user = pool.submit(get, url, auth=(USER, PASSWORD))
        # Once Nix builds (three seconds of `sleep`), the user's request holds the image's lock.
        deadline = time.monotonic() + 60
        while counter.count("nix-store") == 0 and time.monotonic() < deadline and not user.done():
            time.sleep(0.02)
        anonymous = pool.submit(get, url)
        answers = [user.result(), anonymous.result()]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["Docker-Content-Digest"] == answers[1].headers["Docker-Content-Digest"]
    assert counter.count("nix-store") == 1


# ------------------------------------------------------------------------- token auth --

class TokenService:
    """A minimal Docker token service: GET ?service=&scope=repository:NAME:pull, Basic login optional.

    It grants what is asked to the user with the right password, nothing to anonymous callers,
    and signs with `signing_key` for `lifetime` seconds; a test switches either to misbehave."""

    def __init__(self, signing_key: rsa.RSAPrivateKey):
        self.signing_key = signing_key
        self.lifetime = 300
        self.issued: list[dict] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.answer(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def token(self, access: list[dict], subject: str = USER, **claims) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now - 5,
                   "exp": now + self.lifetime, "jti": uuid.uuid4().hex, "access": access, **claims}
        return jwt.encode(payload, self.signing_key, algorithm="RS256")

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        header = handler.headers.get("Authorization", "")
        user = None
        if header:
            if header != "Basic " + base64.b64encode(CREDS.encode()).decode():
                handler.send_response(401)
                handler.end_headers()
                return
            user = USER
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            if user and query.get("service") == [SERVICE]:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.token(access, subject=user or "")
        self.issued.append({"user": user, "scope": query.get("scope", []), "access": access})
        body = json.dumps({"token": token, "access_token": token, "expires_in": self.lifetime}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


@pytest.fixture(scope="module")
def token_key(tmp_path_factory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("token-key") / "token.pem"
    path.write_bytes(pem_public(key))
    return key, path


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, pkgset, token_key) -> Iterator[dict]:
    """A server trusting `token_key`, and the token service it sends clients to."""
    holder = {}
    service = TokenService(token_key[0])
    holder["service"] = service
    server = start(tmp_path_factory.mktemp("token"), {
        "NIXERY_PKGS_PATH": str(pkgset), "NIXERY_TOKEN_REALM": service.realm, "NIXERY_TOKEN_SERVICE": SERVICE,
        "NIXERY_TOKEN_ISSUER": ISSUER, "NIXERY_TOKEN_PUBLIC_KEY": str(token_key[1])})
    holder["server"] = server
    yield holder
    service.httpd.shutdown()


def test_token_challenge_names_realm_service_and_scope(token_server):
    server, service = token_server["server"], token_server["service"]
    ping = get(server.url + "/v2/")
    assert ping.status_code == 401
    assert ping.headers["WWW-Authenticate"] == f'Bearer realm="{service.realm}",service="{SERVICE}"'
    manifest = get(server.url + "/v2/shell/hello/manifests/latest")
    assert manifest.headers["WWW-Authenticate"] == (
        f'Bearer realm="{service.realm}",service="{SERVICE}",scope="repository:shell/hello:pull"')
    assert error_of(manifest)["code"] == "UNAUTHORIZED"
    page = get(server.url + "/").text
    assert service.realm in page and f"docker login {server.host}" in page


def test_skopeo_follows_the_token_flow_and_the_image_runs(token_server, tmp_path):
    server, service = token_server["server"], token_server["service"]
    rootfs = pull_and_unpack(server.host, "shell/hello", tmp_path, creds=CREDS)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
    assert {"user": USER, "scope": ["repository:shell/hello:pull"],
            "access": [{"type": "repository", "name": "shell/hello", "actions": ["pull"]}]} in service.issued
    # Without an account the service grants nothing, and Nixery refuses.
    anonymous = skopeo_pull(server.host, "shell/hello", tmp_path / "anonymous")
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()


@pytest.mark.parametrize("misbehaviour", ["another key", "expired"])
def test_tokens_of_another_key_or_expired_are_refused(token_server, tmp_path, misbehaviour):
    server, service = token_server["server"], token_server["service"]
    good_key = service.signing_key
    try:
        if misbehaviour == "another key":
            service.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            service.lifetime = -3600
        result = skopeo_pull(server.host, "hello", tmp_path / "oci", creds=CREDS)
        assert result.returncode != 0 and "unauthorized" in result.stderr.lower(), result.stderr
        token = service.token([{"type": "repository", "name": "hello", "actions": ["pull"]}])
    finally:
        service.signing_key, service.lifetime = good_key, 300
    response = get(f"{server.url}/v2/hello/manifests/latest", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    reason = "configured keys" if misbehaviour == "another key" else "expired"
    assert any(e.get("message") == "login failed" and reason in e["reason"] for e in server.log_entries())


@pytest.mark.parametrize("claims, access", [
    ({"aud": "another-service"}, "hello"),
    ({"iss": "someone-else"}, "hello"),
    ({"nbf": int(time.time()) + 3600}, "hello"),
    ({}, "shell/hello"),  # a token for another repository
])
def test_tokens_must_name_this_service_issuer_and_repository(token_server, claims, access):
    server, service = token_server["server"], token_server["service"]
    token = service.token([{"type": "repository", "name": access, "actions": ["pull"]}], **claims)
    response = get(f"{server.url}/v2/hello/manifests/latest", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.text
    good = service.token([{"type": "repository", "name": "hello", "actions": ["pull"]}])
    assert get(f"{server.url}/v2/hello/manifests/latest",
               headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_token_build_level_builds_for_granted_tokens_and_serves_digests_to_all(
        tmp_path_factory, pkgset, token_key):
    service = TokenService(token_key[0])
    try:
        server = start(tmp_path_factory.mktemp("token-build"), {
            "NIXERY_PKGS_PATH": str(pkgset), "NIXERY_AUTH": "build", "NIXERY_TOKEN_REALM": service.realm,
            "NIXERY_TOKEN_SERVICE": SERVICE, "NIXERY_TOKEN_ISSUER": ISSUER,
            "NIXERY_TOKEN_PUBLIC_KEY": str(token_key[1])})
        granted = {"Authorization": "Bearer " + service.token([{"type": "repository", "name": "hello",
                                                                 "actions": ["pull"]}])}
        anonymous = {"Authorization": "Bearer " + service.token([], subject="")}
        url = f"{server.url}/v2/hello/manifests/latest"
        # A local directory is never pinned: `latest` runs Nix, so it needs a token granting the repository.
        refused = get(url, headers=anonymous)
        assert refused.status_code == 401 and "scope=\"repository:hello:pull\"" in refused.headers["WWW-Authenticate"]
        built = get(url, headers=granted)
        assert built.status_code == 200
        digest = built.headers["Docker-Content-Digest"]
        # What is built is anyone's, by digest: with a token that grants nothing, or with no token at all.
        for headers in (anonymous, {}):
            by_digest = get(f"{server.url}/v2/hello/manifests/{digest}", headers=headers)
            assert by_digest.status_code == 200 and by_digest.content == built.content
            layer = built.json()["layers"][0]["digest"]
            assert get(f"{server.url}/v2/hello/blobs/{layer}", headers=headers).status_code == 200
    finally:
        service.httpd.shutdown()


# ------------------------------------------------------------------------------- GCS --

def test_gcs_signed_url_redirects_work_with_auth_on(tmp_path, pkgset, htpasswd):
    from test_gcs import ACCOUNT, Emulator, gcs_env

    emulator = Emulator(tmp_path / "gcs", f"nixery-auth-{uuid.uuid4().hex[:8]}").start()
    try:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_path = tmp_path / "signing.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        server = start(tmp_path / "server", gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset),
                                                    NIXERY_HTPASSWD=str(htpasswd), GCS_SIGNING_KEY=str(key_path),
                                                    GCS_SIGNING_ACCOUNT=ACCOUNT))
        rootfs = pull_and_unpack(server.host, "shell/hello", tmp_path, creds=CREDS)
        assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
        layer = get(f"{server.url}/v2/shell/hello/manifests/latest", auth=(USER, PASSWORD)).json()["layers"][0]
        blob_url = f"{server.url}/v2/shell/hello/blobs/{layer['digest']}"
        assert get(blob_url, allow_redirects=False).status_code == 401  # no redirect for anonymous clients
        redirect = get(blob_url, auth=(USER, PASSWORD), allow_redirects=False)
        assert redirect.status_code == 307 and "X-Goog-Signature=" in redirect.headers["Location"]
        # The signed URL is the bucket's, not behind Nixery's login: it carries its own signature.
        body = get(redirect.headers["Location"]).content
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
        server.stop()  # before its bucket goes
    finally:
        emulator.stop()


# ---------------------------------------------------------------- in-process behaviour --

def failed_logins(directory: Path, **kwargs) -> FailedLogins:
    return FailedLogins(StateLayout.under(directory), **kwargs)


def test_failed_logins_double_to_a_cap_then_pause_and_are_forgotten(tmp_path):
    now = [1000.0]
    failures = failed_logins(tmp_path, base_delay=0.05, max_delay=1.0, limit=8, pause=60.0, clock=lambda: now[0])
    delays = [failures.admit("10.0.0.1", None).delay for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert failures.admit("10.0.0.1", None).retry_after == 60.0, "a ninth attempt is not admitted"
    assert failures.retry_after("10.0.0.1") == 60.0 and failures.retry_after("10.0.0.2") == 0
    now[0] += 59
    assert failures.retry_after("10.0.0.1") == pytest.approx(1.0)
    now[0] += 1
    assert failures.retry_after("10.0.0.1") == 0 and failures.admit("10.0.0.1", None).delay == 0.05
    # Another instance of the table (another worker) sees the same counts.
    assert failed_logins(tmp_path, limit=8, clock=lambda: now[0]).admit("10.0.0.1", None).delay == 0.1
    for address in range(100_000):
        failures.admit(f"10.{address >> 16}.{(address >> 8) & 255}.{address & 255}", None)
    assert StateLayout.under(tmp_path).store.stat().st_size <= CAPACITY * 100, "the table's size is fixed"
    failures.succeeded("10.0.1.9")
    assert failures.admit("10.0.1.9", None).delay == 0.05


def test_failed_logins_lock_a_user_name_from_any_address_and_a_login_gives_back_its_attempt(tmp_path):
    failures = failed_logins(tmp_path, limit=3, pause=30.0)
    assert [failures.admit(f"10.0.0.{i}", "alice").retry_after for i in range(3)] == [0, 0, 0]
    assert failures.admit("10.0.0.9", "alice").retry_after > 29, "a fourth address trying alice is refused"
    assert failures.admit("10.0.0.9", "bob").retry_after == 0, "other users are not"
    bob = failed_logins(tmp_path, limit=3, pause=30.0)
    for _ in range(5):  # logins that pass cost bob nothing, however many there are
        assert bob.admit("10.0.0.8", "bob").retry_after == 0
        bob.succeeded("10.0.0.8", "bob")


class _Open:
    def on_get(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        resp.media = {}


def open_manifests(auth: AuthMiddleware) -> falcon.App:
    """An app of `auth` and the manifests route only, which answers `{}` to whoever auth lets through."""
    router = RegistryRouter()
    app = falcon.App(router=router, middleware=[auth])
    error_handlers.register(app, auth.challenge)
    router.add_shape(routes.MANIFESTS, _Open(), no_such_endpoint)
    return app


def test_failed_logins_are_slowed_doubling_to_a_cap_and_a_login_resets_them(htpasswd, tmp_path):
    """The middleware sleeps each failure's delay before its 401: 0.05 s, doubling, capped at 1 s."""
    slept: list[float] = []
    auth = AuthMiddleware(config.load({"HOME": "/root", "NIXERY_HTPASSWD": str(htpasswd)}).auth,
                          failed_logins(tmp_path), sleep=slept.append)
    client = falcon.testing.TestClient(open_manifests(auth))

    def attempt(user: str, password: str) -> int:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return client.simulate_get("/v2/hello/manifests/latest", headers={"Authorization": f"Basic {token}"}).status_code

    assert [attempt("carol", "guess") for _ in range(6)] == [401] * 6
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert attempt(USER, PASSWORD) == 200 and len(slept) == 6, "a login is not slowed"
    assert attempt("carol", "guess") == 401 and slept[6:] == [0.05], "a login from the address resets the count"


def test_too_many_failures_get_429_without_a_password_check(htpasswd, monkeypatch, tmp_path):
    now = [0.0]
    slept: list[float] = []
    auth = AuthMiddleware(config.load({"HOME": "/root", "NIXERY_HTPASSWD": str(htpasswd)}).auth,
                          failed_logins(tmp_path, limit=3, pause=30, clock=lambda: now[0]), sleep=slept.append)
    checked: list[bytes] = []
    checkpw = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda password, hashed: (checked.append(hashed),
                                                                     checkpw(password, hashed))[1])
    client = falcon.testing.TestClient(open_manifests(auth))

    def attempt(password: str) -> falcon.testing.Result:
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        return client.simulate_get("/v2/hello/manifests/latest", headers={"Authorization": f"Basic {token}"})

    assert [attempt("wrong").status_code for _ in range(3)] == [401, 401, 401]
    assert slept == [0.05, 0.1, 0.2]
    blocked = attempt(PASSWORD)
    assert blocked.status_code == 429 and blocked.headers["Retry-After"] == "31"
    assert blocked.json["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(checked) == 3, "a paused address costs no bcrypt check"
    now[0] += 30
    assert attempt(PASSWORD).status_code == 200
    assert attempt(PASSWORD).status_code == 200 and len(checked) == 4, "a login that passed is remembered"


# ---------------------------------------------------------------------- configuration --

def test_auth_level_defaults_and_summary(htpasswd):
    base = {"HOME": "/root"}
    assert config.load(base).auth.level is config.AuthLevel.OFF
    loaded = config.load({**base, "NIXERY_HTPASSWD": str(htpasswd)})
    assert loaded.auth.level is config.AuthLevel.ALL and [u for u, _ in loaded.auth.htpasswd] == [USER, "bob"]
    assert config.load({**base, "NIXERY_HTPASSWD": str(htpasswd), "NIXERY_AUTH": "off"}).auth.level.value == "off"
    assert config.load({**base, "NIXERY_HTPASSWD": str(htpasswd), "NIXERY_AUTH": "BUILD"}).auth.level.value == "build"
    hashes = [line.split(":", 1)[1] for line in htpasswd.read_text().splitlines()]
    for text in (repr(loaded), repr(loaded.summary())):
        assert not any(h in text for h in hashes)


def test_bad_auth_settings_name_the_variable_and_never_the_secret(tmp_path, htpasswd, token_key):
    md5 = subprocess.run(["htpasswd", "-nbm", "eve", PASSWORD], capture_output=True, text=True).stdout.strip()
    mixed = tmp_path / "mixed"
    mixed.write_text(htpasswd.read_text() + md5 + "\n")
    private = tmp_path / "private.pem"
    private.write_bytes(token_key[0].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    token_env = {"NIXERY_TOKEN_REALM": "https://auth.example/token", "NIXERY_TOKEN_SERVICE": SERVICE,
                 "NIXERY_TOKEN_ISSUER": ISSUER, "NIXERY_TOKEN_PUBLIC_KEY": str(token_key[1])}
    cases = [
        ({"NIXERY_HTPASSWD": str(mixed)}, "NIXERY_HTPASSWD line 3"),
        ({"NIXERY_HTPASSWD": str(tmp_path / "missing")}, "NIXERY_HTPASSWD"),
        ({"NIXERY_AUTH": "build"}, "NIXERY_AUTH"),
        ({"NIXERY_AUTH": "some", "NIXERY_HTPASSWD": str(htpasswd)}, "NIXERY_AUTH"),
        ({"NIXERY_TOKEN_REALM": "https://auth.example/token"}, "NIXERY_TOKEN_ISSUER"),
        ({**token_env, "NIXERY_HTPASSWD": str(htpasswd)}, "not both"),
        ({**token_env, "NIXERY_TOKEN_PUBLIC_KEY": str(private)}, "NIXERY_TOKEN_PUBLIC_KEY"),
        ({**token_env, "NIXERY_TOKEN_REALM": "ftp://auth.example"}, "NIXERY_TOKEN_REALM"),
        ({**token_env, "NIXERY_TOKEN_SERVICE": 'a"b'}, "NIXERY_TOKEN_SERVICE"),
    ]
    secret_lines = [md5, *private.read_text().splitlines()[1:-1]]
    for env, expected in cases:
        with pytest.raises(config.ConfigError, match=expected) as raised:
            config.load({"HOME": "/root", **env})
        assert not any(line in str(raised.value) for line in secret_lines), str(raised.value)
    assert config.load({"HOME": "/root", **token_env}).auth.token.realm == "https://auth.example/token"


# ------------------------------------------------------------------------- the secret --

def test_the_password_never_appears_in_any_log_or_response():
    """Runs last: every server this module started, and every response it read."""
    if len(SERVERS) < 5:
        pytest.skip("checks the logs of the whole module's servers: run the module")
    encoded = base64.b64encode(CREDS.encode()).decode()
    failed_logins = 0
    for server in SERVERS:
        log = server.log()
        failed_logins += len([e for e in server.log_entries() if e.get("message") == "login failed"])
        assert PASSWORD not in log and encoded not in log, server.log_path
    assert failed_logins >= 10, "the logs checked hold the failed logins"
    for text in SEEN:
        assert PASSWORD not in text and encoded not in text
