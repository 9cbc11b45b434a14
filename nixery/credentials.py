"""Who may log in, as configured: NIXERY_AUTH, the htpasswd file of NIXERY_HTPASSWD and the token
service of the NIXERY_TOKEN_ variables, with the PEM keys its tokens are verified with.

`auth_settings` reads and validates them once, at start-up (config.load calls it), so a bad
file stops start-up naming its variable, never quoting its content (the files are secrets).
A module of its own beside nixery/auth.py, which uses what it reads: config reads these
settings, and auth's middleware depends on the state that config describes.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path
from typing import Mapping, Optional

from .settings import ConfigError, redact_url, setting


class AuthLevel(str, enum.Enum):
    OFF = "off"
    BUILD = "build"
    ALL = "all"


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """An external token service whose JWTs Nixery accepts; `public_keys` verify their signatures."""

    realm: str = setting(url=True)
    service: str = setting()
    issuer: str = setting()
    public_keys: tuple[object, ...] = setting(hidden=True)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Who must log in, and against what: `htpasswd` holds (user, bcrypt hash) pairs, read at start-up."""

    level: AuthLevel = AuthLevel.OFF
    htpasswd: tuple[tuple[str, str], ...] = setting((), secret=True, key="htpasswd_users",
                                                    show=lambda users, _: len(users) if users else None)
    token: Optional[TokenConfig] = setting(None, flatten=TokenConfig)


# What `htpasswd -B` writes: $2y$, cost, 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_TOKEN_VARIABLES = ("NIXERY_TOKEN_REALM", "NIXERY_TOKEN_SERVICE", "NIXERY_TOKEN_ISSUER", "NIXERY_TOKEN_PUBLIC_KEY")
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)


def read_htpasswd(path: str) -> tuple[tuple[str, str], ...]:
    """The users of an htpasswd file. Errors name the line, never its content (it is secret)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"NIXERY_HTPASSWD={path!r} cannot be read: {type(e).__name__}",
                          lasting=isinstance(e, UnicodeDecodeError)) from None
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, _, hashed = line.strip().partition(":")
        if not user or not _BCRYPT_RE.fullmatch(hashed):
            raise ConfigError(f"NIXERY_HTPASSWD line {number} is not user:bcrypt-hash "
                              "(only bcrypt entries, as `htpasswd -B` writes them, are accepted)")
        if user in entries:
            raise ConfigError(f"NIXERY_HTPASSWD names the user on line {number} twice")
        entries[user] = hashed
    if not entries:
        raise ConfigError(f"NIXERY_HTPASSWD={path!r} has no users")
    return tuple(entries.items())


def read_public_keys(path: str) -> tuple[object, ...]:
    """Every public key or certificate in a PEM file, as the keys tokens are verified with."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    usable = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"NIXERY_TOKEN_PUBLIC_KEY={path!r} cannot be read: {type(e).__name__}",
                          lasting=False) from None
    keys = []
    for block in _PEM_RE.finditer(data):
        try:
            if block.group(1) == b"CERTIFICATE":
                keys.append(x509.load_pem_x509_certificate(block.group(0)).public_key())
            elif block.group(1) == b"PUBLIC KEY":
                keys.append(load_pem_public_key(block.group(0)))
            else:
                raise ValueError(block.group(1).decode())
        except ValueError:
            raise ConfigError(f"NIXERY_TOKEN_PUBLIC_KEY={path!r} holds something that is neither a public key "
                              "nor a certificate (a private key does not belong here)") from None
    if not keys:
        raise ConfigError(f"NIXERY_TOKEN_PUBLIC_KEY={path!r} holds no PEM public key or certificate")
    if not all(isinstance(key, usable) for key in keys):
        raise ConfigError(f"NIXERY_TOKEN_PUBLIC_KEY={path!r} holds a key that is not RSA, EC or EdDSA")
    return tuple(keys)


def auth_settings(env: Mapping[str, str]) -> AuthConfig:
    """NIXERY_AUTH, NIXERY_HTPASSWD and the NIXERY_TOKEN_ variables, validated (config.load calls it)."""
    htpasswd = env.get("NIXERY_HTPASSWD")
    given = [name for name in _TOKEN_VARIABLES if env.get(name)]
    if given and len(given) < len(_TOKEN_VARIABLES):
        missing = sorted(set(_TOKEN_VARIABLES) - set(given))
        raise ConfigError(f"token auth needs {', '.join(missing)} as well as {', '.join(given)}")
    if htpasswd and given:
        raise ConfigError("set NIXERY_HTPASSWD or the NIXERY_TOKEN_ variables, not both")
    token = None
    if given:
        realm = env["NIXERY_TOKEN_REALM"]
        if not re.match(r"^https?://[^\s\"]+$", realm):
            raise ConfigError(f"NIXERY_TOKEN_REALM={redact_url(realm)!r} is not an http(s) URL")
        for name in ("NIXERY_TOKEN_SERVICE", "NIXERY_TOKEN_ISSUER"):
            if '"' in env[name] or not env[name].isprintable():
                raise ConfigError(f"{name} may not contain quotes or control characters")
        token = TokenConfig(realm, env["NIXERY_TOKEN_SERVICE"], env["NIXERY_TOKEN_ISSUER"],
                            read_public_keys(env["NIXERY_TOKEN_PUBLIC_KEY"]))
    users = read_htpasswd(htpasswd) if htpasswd else ()
    value = (env.get("NIXERY_AUTH") or ("all" if users or token else "off")).lower()
    if value not in {level.value for level in AuthLevel}:
        raise ConfigError(f"NIXERY_AUTH={value!r} must be one of off, build, all")
    level = AuthLevel(value)
    if level is not AuthLevel.OFF and not (users or token):
        raise ConfigError(f"NIXERY_AUTH={level.value} needs NIXERY_HTPASSWD or the NIXERY_TOKEN_ variables")
    return AuthConfig(level, users, token)
