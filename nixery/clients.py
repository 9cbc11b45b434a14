"""The real client behind reverse proxies (NIXERY_TRUSTED_PROXIES).

Behind nginx or a Kubernetes Ingress every connection comes from the proxy, so
the per-client limits (new builds, connections, login lockouts) and the logs
would see one client. A proxy names the client in `X-Forwarded-For` (appending
the address it got the request from) or in RFC 7239's `Forwarded`; anyone can
send either header, so they are read only from a trusted peer, and only as far
as trust goes: from the right, the first address that is not itself a trusted
proxy is the client (the entries left of it are the client's own claims).
`X-Forwarded-For` is read when present (every common proxy writes it), else
`Forwarded`: a proxy that writes only `Forwarded` must drop a client's
`X-Forwarded-For`. From any other peer both are ignored.

The worker (nixery/worker.py) uses this on the raw request head to count
connections per client; the app's `RealClient` middleware puts the answer in
the WSGI environ's `REMOTE_ADDR`, which everything else reads.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Optional, Sequence

import falcon

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Where the app leaves the TCP peer's address when REMOTE_ADDR names the client instead.
PEER_KEY = "nixery.peer"
# One element's `for=` parameter: a token or a quoted string (RFC 7239 section 4).
_FOR_RE = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.I)


def address(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """An IP address as proxies write it (`[v6]:port` and `v4:port` too), or None (an obfuscated
    identifier, `unknown`, garbage); an IPv4-mapped IPv6 address as its IPv4 address."""
    text = text.strip().strip('"').replace('\\"', '"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def _forwarded_for(header: str) -> list[str]:
    """The `for=` values of a `Forwarded` header, in order (an element without one counts as unknown)."""
    values = []
    for element in header.split(","):
        match = _FOR_RE.search(element)
        values.append(match.group(1) if match else "unknown")
    return values


class TrustedProxies:
    def __init__(self, networks: Sequence[Network]):
        self.networks = tuple(networks)

    def trusts(self, peer: str) -> bool:
        parsed = address(peer) if self.networks else None
        return parsed is not None and any(parsed in network for network in self.networks)

    def client(self, peer: str, x_forwarded_for: Optional[str], forwarded: Optional[str]) -> str:
        """The client's address for a request from `peer` carrying these headers (None: absent)."""
        if not self.trusts(peer):
            return peer
        if x_forwarded_for is not None and x_forwarded_for.strip():
            hops: Iterable[str] = x_forwarded_for.split(",")
        elif forwarded is not None and forwarded.strip():
            hops = _forwarded_for(forwarded)
        else:
            return peer
        client = peer
        for hop in reversed(list(hops)):
            parsed = address(hop)
            if parsed is None:
                # The proxy we trust wrote what is not an address: nothing to its left can be trusted.
                return client
            client = str(parsed)
            if not self.trusts(client):
                return client
        return client  # every hop is a trusted proxy: the leftmost is as far as we can see


def head_headers(head: bytes, names: Sequence[str]) -> dict[str, Optional[str]]:
    """The values of the headers `names` (lower case) in a raw HTTP/1 request head, repeated
    headers joined with commas as WSGI servers join them; None for a header not sent."""
    found: dict[str, list[str]] = {}
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            if not line.strip():
                break  # the end of the head
            continue
        key = name.strip().lower().decode("latin-1")
        if key in names:
            found.setdefault(key, []).append(value.strip().decode("latin-1"))
    return {name: ",".join(found[name]) if name in found else None for name in names}


class RealClient:
    """Falcon middleware, first of all: `REMOTE_ADDR` names the client, the peer goes to `nixery.peer`."""

    def __init__(self, proxies: TrustedProxies):
        self.proxies = proxies

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        peer = req.env.get("REMOTE_ADDR") or ""
        req.env[PEER_KEY] = peer
        if self.proxies.trusts(peer):
            req.env["REMOTE_ADDR"] = self.proxies.client(
                peer, req.env.get("HTTP_X_FORWARDED_FOR"), req.env.get("HTTP_FORWARDED"))
