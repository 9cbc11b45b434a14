"""nixery/push.py's registry client against a scripted registry: where credentials go, and how an
expired token is renewed in the middle of an upload (distribution itself is driven in
tests/test_build_push.py)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import threading
import urllib.parse
from typing import Iterator

import pytest

from nixery.local import Blob, CommandError
from nixery.push import Destination, Registry, same_origin
from nixery.registry_login import Credential

USER, PASSWORD = "pusher", "pw-9d1c"
DATA = bytes(range(256)) * 40  # 10 KiB
BLOB = Blob("sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA), "application/octet-stream")


class Scripted:
    """A registry that logs every request (method, host, path, Authorization) and takes uploads.

    Basic logins by default; with `tokens`, a Bearer challenge whose tokens each serve
    `token_uses` requests, then are refused (an expiry). Upload sessions are handed out on the
    host `upload_host`: with `uploads_elsewhere`, another name of the same server (as a registry
    may send uploads to its storage), which takes them without a login."""

    def __init__(self, tokens: bool = False, token_uses: int = 1000, uploads_elsewhere: bool = True):
        self.log: list[tuple[str, str, str, str]] = []
        self.received = bytearray()
        self.tokens, self.token_uses = tokens, token_uses
        self.issued: dict[str, int] = {}
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                scripted.answer(self)

            do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = _any

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_address[1]
        # A host name the client must not send credentials to (uploads there need none).
        self.upload_host = f"{'localhost' if uploads_elsewhere else '127.0.0.1'}:{self.port}"
        self.open_hosts = {self.upload_host} if uploads_elsewhere else set()

    def _send(self, handler, status: int, headers: dict[str, str] = {}, body: bytes = b"") -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _authorised(self, header: str) -> bool:
        if not self.tokens:
            return header == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        token = header.removeprefix("Bearer ")
        if token not in self.issued or self.issued[token] >= self.token_uses:
            return False
        self.issued[token] += 1
        return True

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        auth = handler.headers.get("Authorization", "")
        path = urllib.parse.urlsplit(handler.path)
        self.log.append((handler.command, handler.headers["Host"], path.path, auth))
        if path.path == "/token":
            token = f"t{len(self.issued)}"
            self.issued[token] = 0
            return self._send(handler, 200, {"Content-Type": "application/json"}, f'{{"token":"{token}"}}'.encode())
        if handler.headers["Host"] not in self.open_hosts and not self._authorised(auth):
            challenge = (f'Bearer realm="http://127.0.0.1:{self.port}/token",service="scripted"' if self.tokens
                         else 'Basic realm="scripted"')
            return self._send(handler, 401, {"WWW-Authenticate": challenge})
        if handler.command == "POST":
            return self._send(handler, 202, {"Location": f"http://{self.upload_host}/upload/1"})
        if handler.command == "PATCH":
            self.received += body
            return self._send(handler, 202, {"Location": f"/v2/app/blobs/uploads/1?part={len(self.received)}"})
        if handler.command == "PUT":
            self.received += body
            digest = urllib.parse.parse_qs(path.query).get("digest", [""])[0]
            ok = digest == "sha256:" + hashlib.sha256(self.received).hexdigest()
            return self._send(handler, 201 if ok else 400)
        return self._send(handler, 200, {}, b"{}")


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    registry = Scripted()
    yield registry
    registry.httpd.shutdown()


def test_credentials_go_to_the_registry_only_not_to_an_upload_url_elsewhere(scripted):
    registry = Registry(Destination(f"127.0.0.1:{scripted.port}", "app", "1"), Credential(USER, PASSWORD))
    registry.connect()
    location, _ = registry.start_upload(BLOB.digest, None)
    assert urllib.parse.urlsplit(location).netloc == scripted.upload_host
    registry.upload(location, BLOB, lambda: io.BytesIO(DATA), chunk=1 << 20)
    assert bytes(scripted.received) == DATA
    sent = {(method, host): auth for method, host, _, auth in scripted.log}
    assert sent[("POST", f"127.0.0.1:{scripted.port}")].startswith("Basic ")
    assert sent[("PUT", scripted.upload_host)] == ""


def test_an_expired_token_is_renewed_and_the_chunk_sent_again():
    scripted = Scripted(tokens=True, token_uses=3, uploads_elsewhere=False)
    try:
        registry = Registry(Destination(scripted.upload_host, "app", "1"), None)
        registry.connect()
        location, _ = registry.start_upload(BLOB.digest, None)
        registry.upload(location, BLOB, lambda: io.BytesIO(DATA), chunk=4096)
        assert bytes(scripted.received) == DATA
        assert len(scripted.issued) >= 2, "the token ran out and a new one was fetched"
        patches = [entry for entry in scripted.log if entry[0] == "PATCH"]
        assert len(patches) > -(-len(DATA) // 4096), "a chunk refused with the old token was sent again"
    finally:
        scripted.httpd.shutdown()


def test_credentials_go_to_the_same_origin_only():
    """Scheme, host and port alike: a registry behind a TLS proxy that names its upload URLs
    `http://` (its proxy not telling it the scheme) gets no credentials sent in clear."""
    base = "https://registry.example"
    assert same_origin("https://registry.example/v2/app/blobs/uploads/1", base)
    assert same_origin("https://REGISTRY.example:443/v2/", base)
    for elsewhere in ("http://registry.example/v2/app/blobs/uploads/1", "https://registry.example:5000/v2/",
                      "https://storage.example/upload", "https://registry.example.evil/v2/",
                      "https://registry.example:x/v2/"):
        assert not same_origin(elsewhere, base), elsewhere
    assert same_origin("http://127.0.0.1:5000/upload", "http://127.0.0.1:5000")


def test_no_credentials_to_a_plain_http_token_service_of_an_https_registry():
    registry = Registry(Destination("registry.example", "app", "1"), Credential(USER, PASSWORD))
    with pytest.raises(CommandError, match="plain HTTP"):
        registry._login('Bearer realm="http://auth.example/token",service="registry"')
    assert registry.authorization is None
