"""A TLS terminator in front of a test server, as the reverse proxy of a real instance would be.

Nixery speaks plain HTTP; an instance that clients reach over TLS has a proxy in front (the NixOS
module's nginx, an Ingress). This one relays bytes both ways, so the registry sees what the proxy
would pass on. Its certificate names the addresses it listens on and is signed by a CA of its own
(`ca_pem`), which each client is told about the way docs/clients.md says.
"""

from __future__ import annotations

import datetime
import ipaddress
import selectors
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHUNK = 65536


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
                 ca: bool, addresses: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if addresses:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class TlsFront:
    """Listens with TLS on `address` (an IP; port chosen freely) and relays each connection to
    127.0.0.1:`backend_port`. `host` is what clients name (address:port)."""

    def __init__(self, address: str, backend_port: int):
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("nixery test CA", ca_key, "nixery test CA", ca_key, ca=True)
        leaf = _certificate(address, key, "nixery test CA", ca_key, ca=False, addresses=[address])
        self.ca_pem = _pem(ca)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            chain, key_file = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
            chain.write_bytes(_pem(leaf) + self.ca_pem)
            key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            self.context.load_cert_chain(chain, key_file)
        self.backend_port = backend_port
        self.listener = socket.create_server((address, 0))
        self.host = f"{address}:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Relays one connection, both ways, from one thread (an SSL socket is not for two at once)."""
        try:
            client = self.context.wrap_socket(conn, server_side=True)
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
        except OSError:  # a client that gave up on the handshake (it does not trust the CA)
            conn.close()
            return
        with client, backend, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, backend)
            selector.register(backend, selectors.EVENT_READ, client)
            try:
                while True:
                    # Bytes OpenSSL has decrypted already are not news to select().
                    ready = [(client, backend)] if client.pending() else [
                        (key.fileobj, key.data) for key, _ in selector.select()]
                    for source, sink in ready:
                        data = source.recv(CHUNK)
                        if not data:
                            return
                        sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed = True
        self.listener.close()
