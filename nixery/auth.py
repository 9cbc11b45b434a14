"""Who may pull and who may build: HTTP Basic against an htpasswd file, or an external token service.

Registry clients learn how to log in from the challenge that answers their
`/v2/` ping (skopeo, podman and Docker send credentials only after a 401
there), so with any auth level on, an anonymous ping gets 401 and a
`WWW-Authenticate` challenge. At level `all` every request below `/v2/` needs
valid credentials. At level `build` a request without them (or with the empty
ones skopeo sends when it has none) may still read what is built: the
middleware sets `req.context.may_build` to False, and the builder raises
`BuildRefused` just before it would run Nix, which the error handlers answer
with the same 401 challenge.

Wrong credentials are always refused, never treated as anonymous. Failed
logins are logged with the user name and client address, never the password
or token; each failure from an address delays the 401 it gets (doubling,
capped at a second), and after many attempts in a row the address, or the user
name, gets 429 until it has been quiet for a while, without a bcrypt check that
would cost CPU. The counts are shared by all workers (nixery/lockout.py).

Its settings, and the files they name, are read by nixery/credentials.py.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import bcrypt
import falcon
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from . import routes
from .credentials import AuthConfig, AuthLevel, TokenConfig
from .errors import RegistryError
from .image import MAX_NAME_LENGTH, NAME_RE
from .lockout import FailedLogins

log = logging.getLogger(__name__)

BASIC_REALM = "Nixery"
# bcrypt looks at the first 72 bytes of a password only (as Apache's htpasswd does).
_BCRYPT_MAX = 72
_MAX_TOKEN = 16384
_MAX_USER_LOGGED = 64
# Seconds of clock skew allowed between the token service and this instance.
TOKEN_LEEWAY = 30


class InvalidCredentials(Exception):
    """Credentials that were sent and are wrong; the message is for the log and never holds them."""


def repository(req: falcon.Request, params: dict[str, Any]) -> Optional[str]:
    """The repository a request pulls from, if it is a valid name (so it may go into a challenge)."""
    name = params.get("name") if req.uri_template in routes.PULLS else None
    return name if name is not None and len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) else None


class Htpasswd:
    """Checks user names and passwords against bcrypt hashes.

    A bcrypt check costs milliseconds to a quarter of a second by design, and a
    pull makes a request per layer, so a user and password that passed once are
    remembered (as an HMAC under a key that lives in this process only) and
    let through again at once. An unknown user costs a check as well, against a
    hash of the same cost, so timing does not tell which users exist.
    """

    REMEMBERED = 1024

    def __init__(self, entries: tuple[tuple[str, str], ...], on_check: Callable[[], None] = lambda: None):
        """`on_check` is called for each bcrypt check (the metrics count them)."""
        self.hashes = {user: hashed.encode() for user, hashed in entries}
        cost = max(int(hashed[4:6]) for _, hashed in entries)
        self.unknown_user_hash = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=max(4, cost)))
        self.key = os.urandom(32)
        self.passed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.on_check = on_check

    def _fingerprint(self, user: str, password: bytes) -> bytes:
        return hmac.new(self.key, user.encode() + b"\0" + password, hashlib.sha256).digest()

    def remembered(self, user: str, password: bytes) -> bool:
        """Whether this user and password passed a check lately (no bcrypt check needed)."""
        fingerprint = self._fingerprint(user, password)
        with self.lock:
            if fingerprint in self.passed:
                self.passed.move_to_end(fingerprint)
                return True
        return False

    def check(self, user: str, password: bytes) -> None:
        """Returns when the password is the user's; raises InvalidCredentials otherwise."""
        if self.remembered(user, password):
            return
        fingerprint = self._fingerprint(user, password)
        hashed = self.hashes.get(user)
        self.on_check()
        try:
            matches = bcrypt.checkpw(password[:_BCRYPT_MAX], hashed or self.unknown_user_hash)
        except ValueError:  # a NUL byte, which no htpasswd password holds
            matches = False
        if hashed is None:
            raise InvalidCredentials("unknown user")
        if not matches:
            raise InvalidCredentials("wrong password")
        with self.lock:
            self.passed[fingerprint] = None
            while len(self.passed) > self.REMEMBERED:
                self.passed.popitem(last=False)


def _algorithms(key: object) -> list[str]:
    """The JWT algorithms a key can verify: only those, so a token cannot pick a weaker one."""
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ["ES256", "ES384", "ES512"]
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ["EdDSA"]
    return []


class Tokens:
    """Verifies the JWTs of a token service as distribution does: signature by a configured key,
    `exp` (and `nbf` when present), `iss` and `aud`; `access` then says what the token grants."""

    def __init__(self, config: TokenConfig):
        self.config = config

    def verify(self, token: str) -> dict[str, Any]:
        if len(token) > _MAX_TOKEN:
            raise InvalidCredentials("token too long")
        for key in self.config.public_keys:
            try:
                return jwt.decode(token, key, algorithms=_algorithms(key), audience=self.config.service,
                                  issuer=self.config.issuer, leeway=TOKEN_LEEWAY,
                                  options={"require": ["exp", "iss", "aud"]})
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError as e:
                raise InvalidCredentials(f"invalid token: {e}") from None
        raise InvalidCredentials("invalid token: signed by none of the configured keys")

    @staticmethod
    def grants_pull(claims: dict[str, Any], name: str) -> bool:
        for entry in claims.get("access") or []:
            if (isinstance(entry, dict) and entry.get("type") == "repository" and entry.get("name") == name
                    and isinstance(entry.get("actions"), list)
                    and ("pull" in entry["actions"] or "*" in entry["actions"])):
                return True
        return False


class AuthMiddleware:
    """Falcon middleware guarding `/v2/` at the configured level; the page and metrics stay open."""

    def __init__(self, config: AuthConfig, failures: FailedLogins, sleep: Callable[[float], None] = time.sleep,
                 on_check: Callable[[], None] = lambda: None):
        """`failures` counts failed logins for all workers; `on_check` is called for each password check."""
        self.level = config.level
        self.htpasswd = Htpasswd(config.htpasswd, on_check) if config.htpasswd else None
        self.tokens = Tokens(config.token) if config.token else None
        self.failures = failures
        self.sleep = sleep

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         params: dict[str, Any]) -> None:
        """After routing, so the repository is the route's `name` (every path below `/v2/` has a route)."""
        if self.level is AuthLevel.OFF or not (req.uri_template or "").startswith("/v2"):
            return
        name = repository(req, params)
        if self._authenticated(req, name):
            return
        if self.level is AuthLevel.ALL or name is None:
            raise self.challenge(name, "authentication required")
        req.context.may_build = False

    def challenge(self, name: Optional[str], message: str, error: Optional[str] = None) -> RegistryError:
        refusal = RegistryError(401, "UNAUTHORIZED", message, {"name": name, "action": "pull"} if name else None)
        if self.tokens is None:
            refusal.headers["WWW-Authenticate"] = f'Basic realm="{BASIC_REALM}"'
            return refusal
        token = self.tokens.config
        parts = [f'realm="{token.realm}"', f'service="{token.service}"']
        if name:
            parts.append(f'scope="repository:{name}:pull"')
        if error:
            parts.append(f'error="{error}"')
        refusal.headers["WWW-Authenticate"] = "Bearer " + ",".join(parts)
        return refusal

    def _authenticated(self, req: falcon.Request, name: Optional[str]) -> bool:
        """True for credentials that grant pulling `name` (any valid ones at `/v2/` itself), False for
        none; wrong credentials raise 401, and an address that failed too often 429."""
        scheme, _, credentials = (req.auth or "").strip().partition(" ")
        scheme = scheme.lower()
        if not scheme or (scheme == "basic" and credentials.strip() in ("", "Og==")):  # "Og==" is ":"
            return False
        address = req.remote_addr or "unknown"
        wait = self.failures.retry_after(address)
        if wait > 0:
            raise _locked_out(wait)
        user, password, malformed = "", b"", None
        if scheme == "basic" and self.htpasswd:
            try:
                user, password = _basic(credentials)
            except InvalidCredentials as e:
                malformed = e
            if malformed is None and self.htpasswd.remembered(user, password):
                self.failures.succeeded(address)
                return True
        # Counted before the check: concurrent guesses cannot all pass the count.
        attempt = self.failures.admit(address, user if scheme == "basic" and malformed is None else None)
        if attempt.retry_after > 0:
            raise _locked_out(attempt.retry_after)
        try:
            if malformed is not None:
                raise malformed
            if scheme == "basic" and self.htpasswd:
                self.htpasswd.check(user, password)
                self.failures.succeeded(address, user)
                return True
            if scheme == "bearer" and self.tokens:
                claims = self.tokens.verify(credentials.strip())
                user = str(claims.get("sub", ""))
                self.failures.succeeded(address)
                if name is None or self.tokens.grants_pull(claims, name):
                    return True
                if self.level is AuthLevel.ALL:
                    raise self.challenge(name, "the token does not grant pulling this repository",
                                         "insufficient_scope")
                return False
            raise InvalidCredentials(f"{scheme} credentials, which this instance does not take")
        except InvalidCredentials as e:
            log.warning("login failed", extra={"user": user[:_MAX_USER_LOGGED], "client": address,
                                               "reason": str(e), "path": req.path})
            self.sleep(attempt.delay)
            raise self.challenge(name, "authentication failed",
                                 "invalid_token" if scheme == "bearer" else None) from None


def _locked_out(wait: float) -> RegistryError:
    refusal = RegistryError(429, "TOOMANYREQUESTS", "too many failed logins from this address or for this user; "
                            "try again later")
    refusal.headers["Retry-After"] = str(int(wait) + 1)
    return refusal


def _basic(credentials: str) -> tuple[str, bytes]:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCredentials("malformed basic credentials") from None
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise InvalidCredentials("malformed basic credentials")
    return user.decode(errors="replace"), password
