"""Logging in to a registry as Docker and skopeo do: their credential files, and the challenge
a registry answers with (`WWW-Authenticate`: Basic, or Bearer with a token service).

Credentials are looked for where the containers tools (skopeo, podman, buildah) and Docker
keep them, the first file with an entry for the registry winning: `--authfile`,
`REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
`$XDG_CONFIG_HOME/containers/auth.json`, then Docker's `$DOCKER_CONFIG/config.json`
(`~/.docker/config.json`) with its credential helpers (`credHelpers`, `credsStore`).
A key may name the registry (`host:port`, or a URL of it, as `docker login` writes)
or, in containers' files, a repository below it (`host/team`), the longest match winning.
Secrets are never logged nor shown in an error.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Mapping, Optional

from .local import CommandError

_HELPER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# docker-credential-* helpers answer this Username for an identity (refresh) token.
_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class Credential:
    """A user and password, or an identity token (an OAuth2 refresh token a token service takes)."""

    username: str
    password: str = dataclasses.field(default="", repr=False)
    identity_token: str = dataclasses.field(default="", repr=False)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def auth_files(env: Mapping[str, str], authfile: Optional[str] = None) -> list[Path]:
    """Where credentials are looked for, in order."""
    home = Path(env.get("HOME") or Path.home())
    files = [Path(authfile)] if authfile else []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return files


def find(host: str, repository: str, env: Mapping[str, str], authfile: Optional[str] = None) -> Optional[Credential]:
    """The credential for `host` (and `repository` on it) from the first file that has one."""
    for path in auth_files(env, authfile):
        if not path.is_file():
            if authfile and path == Path(authfile):
                raise CommandError(f"--authfile {path}: no such file")
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CommandError(f"cannot read credentials from {path}: {type(e).__name__}") from None
        credential = _from_file(data, path, host, repository)
        if credential:
            return credential
    return None


def _from_file(data: object, path: Path, host: str, repository: str) -> Optional[Credential]:
    if not isinstance(data, dict):
        raise CommandError(f"{path}: not a JSON object of credentials")
    helpers = data.get("credHelpers") or {}
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    if helper or data.get("credsStore"):
        credential = _from_helper(str(helper or data["credsStore"]), host)
        if credential or helper:
            return credential
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise CommandError(f"{path}: `auths` is not an object")
    full = f"{host}/{repository}"
    matches = [(len(key), entry) for key, entry in ((_key(k), e) for k, e in auths.items())
               if key == host or key.startswith(host + "/") and (full == key or full.startswith(key + "/"))]
    if not matches:
        return None
    entry = max(matches, key=lambda match: match[0])[1]
    return _entry(entry, path, host)


def _key(key: str) -> str:
    """An `auths` key as a registry (or repository) name: `docker login` writes URLs, whose host alone counts."""
    if "://" in key:
        return urllib.parse.urlsplit(key).netloc
    return key.rstrip("/")


def _entry(entry: object, path: Path, host: str) -> Optional[Credential]:
    if not isinstance(entry, dict):
        raise CommandError(f"{path}: the entry for {host} is not an object")
    if entry.get("identitytoken"):
        return Credential(username=str(entry.get("username", "")), identity_token=str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            user, colon, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            colon = ""
        if not colon:
            raise CommandError(f"{path}: the `auth` of {host} is not base64 of user:password")
        return Credential(user, password)
    if entry.get("username"):
        return Credential(str(entry["username"]), str(entry.get("password", "")))
    return None


def _from_helper(helper: str, host: str) -> Optional[Credential]:
    """What `docker-credential-HELPER get` answers for `host` (None when it has nothing)."""
    if not _HELPER_RE.fullmatch(helper):
        raise CommandError(f"credential helper {helper!r} is not a helper name")
    try:
        answer = subprocess.run([f"docker-credential-{helper}", "get"], input=host, capture_output=True, text=True,
                                timeout=HELPER_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CommandError(f"credential helper docker-credential-{helper} cannot run: {type(e).__name__}") from None
    if answer.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        data = json.loads(answer.stdout)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"credential helper docker-credential-{helper} answered no credentials") from None
    return Credential(username="", identity_token=secret) if user == _TOKEN_USER else Credential(user, secret)


@dataclasses.dataclass(frozen=True)
class Challenge:
    """A `WWW-Authenticate` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Optional[Challenge]:
    """`Bearer realm="https://auth/token",service="registry",scope="..."` (or `Basic realm=...`)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {}
    for match in _PARAM_RE.finditer(rest):
        params[match.group(1).lower()] = match.group(2).replace('\\"', '"') if match.group(2) is not None \
            else match.group(3)
    return Challenge(scheme.lower(), params)


def token_request(challenge: Challenge, scopes: list[str],
                  credential: Optional[Credential]) -> tuple[str, Optional[bytes], dict[str, str]]:
    """The request for a token (URL, form body or None for GET, headers), as distribution's
    token spec has it: GET with Basic credentials, or an OAuth2 POST for an identity token."""
    realm = challenge.params.get("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise CommandError(f"the registry's token service is not an http(s) URL: {realm!r}")
    service = challenge.params.get("service", "")
    if credential and credential.identity_token:
        form = {"grant_type": "refresh_token", "refresh_token": credential.identity_token, "service": service,
                "scope": " ".join(scopes), "client_id": "nixery"}
        return realm, urllib.parse.urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded"}
    query = [("service", service), *(("scope", scope) for scope in scopes)]
    if credential:
        query.append(("account", credential.username))
    separator = "&" if "?" in realm else "?"
    return realm + separator + urllib.parse.urlencode(query), None, \
        {"Authorization": credential.basic()} if credential else {}


def token_of(body: bytes) -> str:
    try:
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise CommandError("the registry's token service answered no token")
    return token
