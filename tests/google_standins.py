"""Stand-ins for the two Google services a pod under Workload Identity talks to besides GCS,
at the HTTP level, so that google-auth and google-cloud-storage run their own code unchanged:

- the metadata server (what GKE's Workload Identity serves a pod: its service account, an
  access token), reached through google-auth's documented GCE_METADATA_HOST and
  GCE_METADATA_IP variables;
- IAM Credentials' signBlob at its real address, https://iamcredentials.googleapis.com/, reached
  the way any `requests` user reaches the internet from behind a proxy: HTTPS_PROXY names a
  local proxy whose CONNECT tunnel ends in a TLS server holding a certificate for that host,
  issued by a test CA that REQUESTS_CA_BUNDLE makes trusted. It signs with a test RSA key.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IAM_HOST = "iamcredentials.googleapis.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
_SIGN_BLOB = re.compile(r"^/v1/projects/-/serviceAccounts/([^/:]+):signBlob(\?.*)?$")


def _serve(handler: type, state: object) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status: int, body: bytes, content_type: str = "application/json",
               headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Metadata:
    """The GKE metadata server of a pod whose Kubernetes service account is bound to `account`."""

    account: str
    token: str = "ya29.test-workload-identity-token"
    project: str = "nixery-test"
    tokens_issued: int = 0
    server: Optional[http.server.ThreadingHTTPServer] = None

    def start(self) -> "Metadata":
        self.server = _serve(_MetadataHandler, self)
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def env(self) -> dict[str, str]:
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host}

    def stop(self) -> None:
        self.server.shutdown()


class _MetadataHandler(_Handler):
    def do_GET(self) -> None:
        state: Metadata = self.server.state  # type: ignore[attr-defined]
        flavor = {"Metadata-Flavor": "Google"}
        if self.headers.get("Metadata-Flavor") != "Google":
            self.answer(403, b"missing Metadata-Flavor header", "text/plain", flavor)
            return
        path = self.path.split("?", 1)[0]
        accounts = "/computeMetadata/v1/instance/service-accounts/"
        if path == "/":
            self.answer(200, b"", "text/plain", flavor)
        elif path in (f"{accounts}default/", f"{accounts}{state.account}/"):
            info = {"aliases": ["default"], "email": state.account, "scopes": [CLOUD_PLATFORM]}
            self.answer(200, json.dumps(info).encode(), headers=flavor)
        elif path in (f"{accounts}default/token", f"{accounts}{state.account}/token"):
            state.tokens_issued += 1
            token = {"access_token": state.token, "expires_in": 3599, "token_type": "Bearer"}
            self.answer(200, json.dumps(token).encode(), headers=flavor)
        elif path == "/computeMetadata/v1/project/project-id":
            self.answer(200, state.project.encode(), "text/plain", flavor)
        elif path == "/computeMetadata/v1/universe/universe-domain":
            self.answer(200, b"googleapis.com", "text/plain", flavor)
        else:
            self.answer(404, b"not found", "text/plain", flavor)


def _certificates(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for `host` it issued: (CA, certificate, key) PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Nixery test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class SignBlob:
    """IAM Credentials' signBlob for one service account, signing with `key` for callers whose
    bearer token is `token`; `refuse` answers 403 as IAM does to an account that lacks
    iam.serviceAccounts.signBlob. Every call is recorded as (account, token) in `calls`."""

    account: str
    token: str
    key: rsa.RSAPrivateKey
    workdir: Path
    refuse: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)
    tunnels: list[str] = field(default_factory=list)
    proxy: Optional[http.server.ThreadingHTTPServer] = None
    ca: Optional[Path] = None
    tls: Optional[ssl.SSLContext] = None

    def start(self) -> "SignBlob":
        self.ca, cert, key = _certificates(self.workdir, IAM_HOST)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.proxy = _serve(_ProxyHandler, self)
        return self

    def env(self) -> dict[str, str]:
        """What a process needs to reach this stand-in as IAM: the proxy, and the test CA."""
        return {"HTTPS_PROXY": f"http://127.0.0.1:{self.proxy.server_port}", "NO_PROXY": "127.0.0.1,localhost",
                "REQUESTS_CA_BUNDLE": str(self.ca)}

    def stop(self) -> None:
        self.proxy.shutdown()


class _ProxyHandler(_Handler):
    """An HTTPS proxy that opens tunnels to IAM's host only, and ends them in the stand-in."""

    def do_CONNECT(self) -> None:
        state: SignBlob = self.server.state  # type: ignore[attr-defined]
        state.tunnels.append(self.path)
        self.close_connection = True
        if self.path.split(":")[0] != IAM_HOST:
            self.answer(403, b"this proxy only reaches " + IAM_HOST.encode(), "text/plain")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        with state.tls.wrap_socket(self.connection, server_side=True) as tls:
            _SignBlobHandler(tls, self.client_address, self.server)


class _SignBlobHandler(_Handler):
    def do_POST(self) -> None:
        state: SignBlob = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        match = _SIGN_BLOB.match(self.path)
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if not match:
            self.answer(404, b'{"error": {"code": 404, "status": "NOT_FOUND"}}')
            return
        state.calls.append((match.group(1), token))
        if token != state.token:
            self.answer(401, b'{"error": {"code": 401, "message": "Request had invalid authentication '
                             b'credentials.", "status": "UNAUTHENTICATED"}}')
        elif state.refuse or match.group(1) != state.account:
            self.answer(403, json.dumps({"error": {"code": 403, "status": "PERMISSION_DENIED", "message":
                        "Permission 'iam.serviceAccounts.signBlob' denied on resource (or it may not exist)."}})
                        .encode())
        else:
            signature = state.key.sign(base64.b64decode(body["payload"]), padding.PKCS1v15(), hashes.SHA256())
            self.answer(200, json.dumps({"keyId": "test-key-1",
                                         "signedBlob": base64.b64encode(signature).decode()}).encode())
