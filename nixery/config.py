"""Nixery's configuration, read once from the environment at start-up.

Everything else receives a `Config` (or a part of it) as an argument; no other
module reads `os.environ` (the server only sets the one variable that
prometheus_client reads), so a test can build any configuration it needs and
a typo in a variable is reported once, at start-up, naming the variable.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import ipaddress
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

from . import cgroup
# AuthLevel and TokenConfig are named through config as well (config.AuthLevel), like every setting.
from .credentials import AuthConfig, AuthLevel, TokenConfig, auth_settings  # noqa: F401
from .image import PLATFORMS
from .settings import ConfigError, redact_url, setting, summarise


class SourceKind(str, enum.Enum):
    CHANNEL = "channel"
    GIT = "git"
    PATH = "path"


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable Nixery reads, as docs/configuration.md's table lists it."""

    name: str
    default: Optional[str]
    help: str
    secret: bool = False


DEFAULT_CHANNEL = "nixos-unstable"
# OCI platforms an image can be offered for (nixery/image.py maps them to Nix systems).
PLATFORM_NAMES = tuple(PLATFORMS)
# What NIXERY_CHANNEL and NIXERY_CHANNEL_ALLOW may name (a channel, or a commit for NIXERY_CHANNEL).
CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_CHANNEL_URL = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"
# Below this, Nix cannot even start an evaluation (NIXERY_EVAL_MEMORY).
EVAL_MEMORY_LEAST = 64 << 20
# The most components a repository name of 255 characters can have (NIXERY_MAX_PACKAGES' range).
MAX_COMPONENTS = 128

# The single list of variables: `--help`, docs/configuration.md's table (scripts/variables-table)
# and the NixOS module test all read it, so none of them can drift from the code.
VARIABLES: tuple[Variable, ...] = (
    Variable("PORT", "8080", "TCP port to listen on."),
    Variable("NIXERY_LISTEN_ADDRESS", "0.0.0.0", "Address to bind to."),
    Variable("NIXERY_CHANNEL", DEFAULT_CHANNEL,
             "nixpkgs channel name or 40-hex commit to build from (the default source)."),
    Variable("NIXERY_CHANNEL_URL_TEMPLATE", DEFAULT_CHANNEL_URL,
             "URL of a nixpkgs tarball; {rev} is replaced by the channel or commit."),
    Variable("NIXERY_CHANNEL_ALLOW", "",
             "Comma-separated channels that a tag may name (empty: only latest and commits)."),
    Variable("NIXERY_CHANNEL_COMMITS", "any",
             "Which nixpkgs commits a 40-hex tag may name on the channel source: any, none, or a "
             "comma-separated list of commits."),
    Variable("NIXERY_ALLOWED_URIS", "",
             "Comma-separated URL prefixes the package set's evaluation may fetch from (Nix's allowed-uris; "
             "a channel's own tarball needs none)."),
    Variable("NIXERY_PKGS_REPO", None,
             "Git repository (https, ssh, file:// or path) of a package set; tags pick refs."),
    Variable("NIXERY_PKGS_PATH", None, "Local directory holding a package set."),
    Variable("NIXERY_GIT_TTL", "60", "Seconds before a git branch is fetched again."),
    Variable("NIXERY_SSH_KEY", None, "Private key file for ssh git URLs.", secret=True),
    Variable("NIXERY_GIT_TOKEN", None, "Token for https git URLs.", secret=True),
    Variable("NIXERY_STORAGE_BACKEND", "filesystem", "Where blobs live: filesystem or gcs."),
    Variable("STORAGE_PATH", None,
             "Directory for the filesystem backend (default: $XDG_DATA_HOME/nixery or ~/.local/share/nixery)."),
    Variable("NIXERY_STORAGE_LIMIT", "0",
             "Most bytes of layers and manifests storage keeps (K, M, G or T; 0: no limit): a collection "
             "removes the least recently pulled images until storage is under it."),
    Variable("NIXERY_STORAGE_MAX_AGE", "0",
             "How long an image may go unpulled before a collection removes it (seconds, or with s, m, h or d: "
             "30d; 0: for ever)."),
    Variable("NIXERY_GC_INTERVAL", None,
             "Time between the server's collections of storage (seconds, or with s, m, h or d; 0: none, "
             "`nixery gc` runs one); default 1h when NIXERY_STORAGE_LIMIT or NIXERY_STORAGE_MAX_AGE is set, else 0."),
    Variable("NIXERY_GC_GRACE", "10m",
             "How long a collection keeps whatever was pulled, built or written lately, whatever the budget "
             "(seconds, or with s, m, h or d): pulls and builds in progress finish."),
    Variable("NIXERY_STATE_DIR", None,
             "Directory for locks, GC roots, git mirrors and the state database (default: $XDG_CACHE_HOME/nixery "
             "or ~/.cache/nixery)."),
    Variable("BUCKET", None, "GCS bucket (implies the gcs backend); GCS_BUCKET is the same."),
    Variable("GCS_BUCKET", None, "GCS bucket (implies the gcs backend)."),
    Variable("GCS_SIGNING_KEY", None, "PEM private key file used to sign blob URLs (optional: without it, "
             "Application Default Credentials sign, through IAM where they hold no key).", secret=True),
    Variable("GCS_SIGNING_ACCOUNT", None, "Service account e-mail that owns GCS_SIGNING_KEY, or that IAM signs "
             "blob URLs as (default: the credentials' own account)."),
    Variable("GCS_SIGNED_URL_TTL", "300", "Seconds a signed blob URL stays valid."),
    Variable("GCS_RETRY_SECONDS", "10", "Seconds a failing GCS request is retried before the client gets a 503."),
    Variable("NIX_TIMEOUT", "60",
             "Seconds a Nix build may run, and may stay silent (Nix's --timeout and --max-silent-time); "
             "downloads of substitutes are not counted."),
    Variable("NIXERY_NIX_STORE_LIMIT", "0",
             "Size of the Nix store (the NAR sizes of its paths; K, M, G or T) past which Nixery collects its "
             "garbage, keeping the images still in storage and the builds running (0: never; for a store of "
             "Nixery's own: on a shared one, the system's collection frees what Nixery no longer roots)."),
    Variable("NIXERY_MAX_BUILDS", None,
             "Builds running at once on this instance (default: the CPUs its cgroup's quota and affinity allow, "
             "at most its cgroup's memory limit divided by NIXERY_EVAL_MEMORY; at least 1)."),
    Variable("NIXERY_CLIENT_BUILDS", "2",
             "New builds one client address may have running at once; more get 429 TOOMANYREQUESTS."),
    Variable("NIXERY_FAILURE_TTL", "60",
             "Seconds a failed build or an unknown name is answered from memory, per source revision, and a "
             "failed derivation, whatever image needs it (0: never)."),
    Variable("NIXERY_MAX_IMAGE_SIZE", "1G",
             "Most bytes of packages an image may hold (its closure's size in the Nix store; K, M, G or T: "
             "powers of 1024; 0: no limit); a bigger image is refused before any layer is written."),
    Variable("NIXERY_MAX_PACKAGES", "20",
             "Most components in an image name (packages, shell, arm64, nonroot; 0: no limit); a longer name "
             "is refused before Nix runs."),
    Variable("NIXERY_EVAL_MEMORY", "2G",
             "Memory one evaluation of the package set may take (the Nix process's data, RLIMIT_DATA; K, M, G "
             "or T; at least 64M; 0: no limit)."),
    Variable("NIXERY_EVAL_TIMEOUT", None,
             "Seconds one evaluation of the package set may take, fetching a channel's tarball included "
             "(default: NIX_TIMEOUT)."),
    Variable("NIXERY_BINARY_CACHE", None,
             "Nix store URL of a binary cache shared by instances (file:///..., s3://...): built paths are copied there and substituted from it."),
    Variable("NIXERY_BINARY_CACHE_PUBLIC_KEY", None,
             "Public key (name:base64) that paths in NIXERY_BINARY_CACHE must be signed with."),
    Variable("NIXERY_BINARY_CACHE_SECRET_KEY", None,
             "Nix secret key file that signs what this instance copies to NIXERY_BINARY_CACHE (unset: read only).",
             secret=True),
    Variable("NIX_POPULARITY_URL", None,
             "URL or file of popularity data (JSON: store path name -> count)."),
    Variable("NIXERY_LAYER_BUDGET", "94", "Most store-path layers in an image (the root layer is extra)."),
    Variable("NIXERY_PLATFORMS", None,
             "Comma-separated OCI platforms (linux/amd64, linux/arm64) an image is offered for, as an index "
             "to clients that take one (default: those this instance's Nix builds: its system and extra-platforms)."),
    Variable("NIXERY_NIX_SNAPSHOTTER", "false",
             "true: annotate layers with their store paths for nix-snapshotter (changes manifest digests)."),
    Variable("NIXERY_WORKERS", "2", "Gunicorn worker processes."),
    Variable("NIXERY_THREADS", "64",
             "Threads per worker: requests being served, downloads and builds (requests waiting for "
             "another's build, and connections still sending their headers, hold none)."),
    Variable("NIXERY_HEADER_TIMEOUT", "10", "Seconds a client may take to send a request's headers."),
    Variable("NIXERY_IO_TIMEOUT", "30",
             "Seconds a client may stall reading a response (or sending a body) before it is cut off."),
    Variable("NIXERY_CLIENT_CONNECTIONS", "64",
             "Open connections one client address may have to each worker; more are answered 429."),
    Variable("NIXERY_TRUSTED_PROXIES", "",
             "Comma-separated addresses or CIDR networks of reverse proxies: from them, the client's address is "
             "read from X-Forwarded-For (or Forwarded), for every per-client limit and log."),
    Variable("NIXERY_GRACE_PERIOD", None,
             "Seconds a stopping server lets running builds and downloads finish (default: NIX_TIMEOUT)."),
    Variable("NIXERY_LOG_LEVEL", "INFO", "Log level: DEBUG, INFO, WARNING or ERROR."),
    Variable("NIXERY_LOG_FORMAT", "auto",
             "Log lines as json (one object a line, for collectors) or text (for people); auto: text when "
             "stderr is a terminal, else json."),
    Variable("NIXERY_IGNORE_VARIABLES", "",
             "Comma-separated NIXERY_ variables that are not Nixery's (a wrapper's own settings): without this, "
             "an unknown NIXERY_ variable stops start-up, as it is most likely a typo."),
    Variable("NIXERY_ACCESS_LOG", "false", "true: log every HTTP request as one line (method, path, status, "
             "bytes, duration, client)."),
    Variable("NIXERY_HIDE_DETAILS", "false", "true: the web page shows no recent builds or errors and no server "
             "paths, and /builds.json answers 403 (for a public instance)."),
    Variable("NIXERY_ALLOW_UNFREE", "false", "true: serve packages with unfree licenses (nixpkgs' "
             "config.allowUnfree); broken and insecure packages are always refused."),
    Variable("NIXERY_AUTH", None,
             "Who must log in: off, build (pulling a built image is open, building a new one needs a login) "
             "or all (every /v2/ request); default all when NIXERY_HTPASSWD or token auth is set, else off."),
    Variable("NIXERY_HTPASSWD", None, "htpasswd file of the users who may log in (bcrypt entries, htpasswd -B).",
             secret=True),
    Variable("NIXERY_TOKEN_REALM", None,
             "URL of an external token service (Docker token auth); needs the other NIXERY_TOKEN_ variables."),
    Variable("NIXERY_TOKEN_SERVICE", None, "Service name the token service issues tokens for (their aud claim)."),
    Variable("NIXERY_TOKEN_ISSUER", None, "The token service's name in its tokens (their iss claim)."),
    Variable("NIXERY_TOKEN_PUBLIC_KEY", None,
             "PEM file of the public key(s) or certificate(s) whose private keys sign the tokens."),
)

VARIABLE_NAMES = frozenset(v.name for v in VARIABLES)


@dataclasses.dataclass(frozen=True)
class PackageSource:
    """Where packages come from; `argument` is a channel, a repository URL or a path."""

    kind: SourceKind
    argument: str = setting(url=True)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server listens and treats its clients (nixery/server.py, nixery/worker.py)."""

    port: int
    listen_address: str
    workers: int
    threads: int
    header_timeout: int
    io_timeout: int
    client_connections: int
    # Reverse proxies whose X-Forwarded-For / Forwarded headers name the client (nixery/clients.py).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    grace_period: int

    @property
    def bind(self) -> str:
        """`address:port` as Gunicorn binds it and the start-up check names it (an IPv6 address in brackets)."""
        address = f"[{self.listen_address}]" if ":" in self.listen_address else self.listen_address
        return f"{address}:{self.port}"


@dataclasses.dataclass(frozen=True)
class BuildLimits:
    """What builds may cost (nixery/admission.py, nixery/nix): builds at once (`max_builds`, all
    clients; `client_builds`, one client), how long a failure is answered from memory
    (`failure_ttl` seconds), and one request's bounds: closure bytes (`max_image_size`), name
    components (`max_packages`), evaluation bytes and seconds (`eval_memory`, `eval_timeout`).
    0 means no bound, which is also what code given no configuration (a test's builder) gets."""

    max_builds: int = 1
    client_builds: int = 1
    failure_ttl: int = 0
    max_image_size: int = 0
    max_packages: int = 0
    eval_memory: int = 0
    eval_timeout: int = 0


@dataclasses.dataclass(frozen=True)
class GitConfig:
    """How a git source (NIXERY_PKGS_REPO) is reached: its branches fetched again after `ttl`
    seconds, with the ssh key or token given."""

    ttl: int
    ssh_key: Optional[Path] = setting(secret=True)
    token: Optional[str] = setting(secret=True)
    # Where libgit2 finds the default ssh keys, and whether an SSH agent is there (SSH_AUTH_SOCK).
    ssh_dir: Path = setting(hidden=True)
    ssh_agent: bool = setting(hidden=True)


@dataclasses.dataclass(frozen=True)
class GcsConfig:
    bucket: str
    signing_key: Optional[Path] = setting(secret=True)
    signing_account: Optional[str] = setting()
    signed_url_ttl: int = setting()
    retry_seconds: int = setting()


@dataclasses.dataclass(frozen=True)
class GcConfig:
    """The storage budget (nixery/collector.py): at most `storage_limit` bytes (0: any), no image
    unpulled for more than `max_age` seconds (0: any age); a collection every `interval` seconds
    (0: none scheduled), and nothing used within the last `grace` seconds is removed."""

    storage_limit: int = 0
    max_age: int = 0
    interval: int = 0
    grace: int = 600


@dataclasses.dataclass(frozen=True)
class BinaryCacheConfig:
    """A Nix binary cache shared by instances; without `secret_key` this instance only reads it."""

    url: str = setting(url=True)
    public_key: str = setting()
    secret_key: Optional[Path] = setting(secret=True)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The one description of what lives under NIXERY_STATE_DIR (node-local, never shared
    between instances); every module that keeps state there takes its folder from here."""

    locks: Path  # OFD byte-range locks: one build per image, build slots, one git fetch (nixery/locks.py)
    # GC roots of builds in progress (the server clears dead workers' roots) and, under images/,
    # of the images kept in storage (nixery/nixstore.py)
    gcroots: Path
    git: Path  # git mirrors and the checkouts exported from them, a folder per repository
    prometheus: Path  # prometheus_client's multiprocess files, made afresh at each start
    # The database of what workers share (nixery/state.py): failures, failed logins, the build
    # history and builds in progress, the build memo, git fetches, the images pulled.
    store: Path
    # Where `nixery push` remembers the repositories it pushed each blob to, to mount it from (nixery/push.py).
    pushed: Path

    @classmethod
    def under(cls, root: Path) -> "StateLayout":
        return cls(locks=root / "locks", gcroots=root / "gcroots", git=root / "git",
                   prometheus=root / "prometheus", store=root / "state.sqlite3", pushed=root / "pushed")


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated configuration. No defaults here: `load` applies those of `VARIABLES`,
    so there is one place that says what an unset variable means."""

    server: ServerConfig = setting(flatten=ServerConfig)
    source: PackageSource
    channel_url_template: str = setting(url=True)
    channel_allow: tuple[str, ...]
    # The commits a 40-hex tag may name on the channel source: None for any, () for none.
    channel_commits: Optional[tuple[str, ...]] = setting(show=lambda commits, _: "any" if commits is None
                                                         else list(commits))
    # URL prefixes evaluation may fetch from besides a channel's tarball (Nix's allowed-uris).
    allowed_uris: tuple[str, ...] = setting(url=True)
    git: GitConfig = setting(flatten=GitConfig)
    storage_backend: str = setting()
    storage_path: Path = setting(show=lambda path, config: str(path) if config.storage_backend == "filesystem"
                                 else None)
    state_dir: Path = setting()
    gcs: Optional[GcsConfig] = setting(flatten=GcsConfig)
    gc: GcConfig = setting(flatten=GcConfig)
    nix_timeout: int = setting()
    # Bytes of Nix store past which Nixery collects the store's garbage (0: never).
    nix_store_limit: int
    limits: BuildLimits = setting(flatten=BuildLimits, key="")
    binary_cache: Optional[BinaryCacheConfig]
    popularity_url: Optional[str] = setting(url=True)
    layer_budget: int
    # OCI platforms images are offered for; empty: the ones this instance's Nix can build (asked at start).
    platforms: tuple[str, ...]
    nix_snapshotter: bool
    log_level: str
    log_format: str
    # NIXERY_ names that are not Nixery's and not a typo (NIXERY_IGNORE_VARIABLES).
    ignored_variables: tuple[str, ...]
    auth: AuthConfig
    access_log: bool
    hide_details: bool
    allow_unfree: bool

    @property
    def state(self) -> StateLayout:
        return StateLayout.under(self.state_dir)

    def summary(self) -> dict[str, object]:
        """The effective configuration with secrets left out, for the start-up log and the web page."""
        return summarise(self)


def _int(env: Mapping[str, str], name: str, lo: int, hi: int, default: Optional[int] = None) -> int:
    """`name` as a whole number in [lo, hi]; `default` stands in for variables whose default is computed."""
    raw = env.get(name) or _default(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range ({lo} to {hi})")
    return value


_SIZE_RE = re.compile(r"(\d+)([KMGT]?)", re.I)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_size(value: int) -> str:
    """Bytes as people read them, in the units the size variables take: 1.5G, 300M, 12K, 900 bytes."""
    for unit in ("T", "G", "M", "K"):
        if value >= _SIZE_UNITS[unit]:
            return f"{value / _SIZE_UNITS[unit]:.3g}{unit}"
    return f"{value} bytes"


def parse_size(text: str) -> Optional[int]:
    """Bytes from a whole number, or one with a K, M, G or T suffix (powers of 1024); None if `text`
    is neither."""
    match = _SIZE_RE.fullmatch(text.strip())
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()] if match else None


def _size(env: Mapping[str, str], name: str, least: int = 0) -> int:
    """`name` as bytes (parse_size); 0 means no limit, anything else must be at least `least`."""
    raw = (env.get(name) or _default(name)).strip()
    value = parse_size(raw)
    if value is None:
        raise ConfigError(f"{name}={raw!r} is not a size (bytes, or a number with K, M, G or T: 512M, 2G)")
    if 0 < value < least:
        raise ConfigError(f"{name}={raw!r} is less than {least >> 20}M (0: no limit)")
    return value


_DURATION_RE = re.compile(r"(\d+)([smhd]?)", re.I)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(env: Mapping[str, str], name: str, hi: int, default: Optional[str] = None) -> int:
    """`name` as seconds: a whole number, or one with s, m, h or d (90, 15m, 2h, 30d), at most `hi`."""
    raw = (env.get(name) or _default(name) or default or "0").strip()
    match = _DURATION_RE.fullmatch(raw)
    if not match:
        raise ConfigError(f"{name}={raw!r} is not a duration (seconds, or a number with s, m, h or d: 90, 15m, 30d)")
    value = int(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if value > hi:
        raise ConfigError(f"{name}={raw!r} is out of range (at most {hi // 86400}d)")
    return value


def _gc(env: Mapping[str, str]) -> GcConfig:
    limit = _size(env, "NIXERY_STORAGE_LIMIT")
    max_age = _duration(env, "NIXERY_STORAGE_MAX_AGE", 10 * 365 * 86400)
    budgeted = bool(limit or max_age)
    return GcConfig(storage_limit=limit, max_age=max_age,
                    interval=_duration(env, "NIXERY_GC_INTERVAL", 365 * 86400, default="1h" if budgeted else "0"),
                    grace=_duration(env, "NIXERY_GC_GRACE", 7 * 86400))


def _default(name: str) -> str:
    for var in VARIABLES:
        if var.name == name:
            return var.default or ""
    raise KeyError(name)


def _source(env: Mapping[str, str]) -> PackageSource:
    given = {name: env[name] for name in ("NIXERY_CHANNEL", "NIXERY_PKGS_REPO", "NIXERY_PKGS_PATH")
             if env.get(name)}
    if len(given) > 1:
        raise ConfigError(f"set only one package source, not {' and '.join(sorted(given))}")
    if "NIXERY_PKGS_PATH" in given:
        path = Path(given["NIXERY_PKGS_PATH"]).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"NIXERY_PKGS_PATH={given['NIXERY_PKGS_PATH']!r} does not exist", lasting=False)
        return PackageSource(SourceKind.PATH, str(path))
    if "NIXERY_PKGS_REPO" in given:
        url = given["NIXERY_PKGS_REPO"]
        if not re.match(r"^(https?://|ssh://|file://|/|[\w.-]+@[\w.-]+:)", url):
            raise ConfigError(f"NIXERY_PKGS_REPO={redact_url(url)!r} is not an https, ssh, file:// URL or absolute path")
        return PackageSource(SourceKind.GIT, url)
    channel = given.get("NIXERY_CHANNEL", _default("NIXERY_CHANNEL"))
    if not CHANNEL_NAME_RE.fullmatch(channel):
        raise ConfigError(f"NIXERY_CHANNEL={channel!r} is not a channel name or commit")
    return PackageSource(SourceKind.CHANNEL, channel)


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of a variable: its entries stripped, empty ones and repeats left out, in order."""
    return tuple(dict.fromkeys(entry.strip() for entry in raw.split(",") if entry.strip()))


def _channel_commits(env: Mapping[str, str]) -> Optional[tuple[str, ...]]:
    raw = (env.get("NIXERY_CHANNEL_COMMITS") or _default("NIXERY_CHANNEL_COMMITS")).strip()
    if raw.lower() == "any":
        return None
    if raw.lower() == "none":
        return ()
    commits = _names(raw)
    for commit in commits:
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise ConfigError(f"NIXERY_CHANNEL_COMMITS names {commit!r}: give any, none, or full 40-hex "
                              "lower-case commits separated by commas")
    return commits


def _allowed_uris(env: Mapping[str, str]) -> tuple[str, ...]:
    uris = _names(env.get("NIXERY_ALLOWED_URIS") or "")
    for uri in uris:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", uri):
            raise ConfigError(f"NIXERY_ALLOWED_URIS names {redact_url(uri)!r}, which is not a URL prefix "
                              "(scheme://..., without spaces)")
    return uris


# Files whose content is secret; GOOGLE_APPLICATION_CREDENTIALS is Google's library's, not ours.
_SECRET_FILES = ("GCS_SIGNING_KEY", "NIXERY_HTPASSWD", "NIXERY_SSH_KEY", "NIXERY_BINARY_CACHE_SECRET_KEY",
                 "GOOGLE_APPLICATION_CREDENTIALS")


def _check_secrets_outside(source: PackageSource, env: Mapping[str, str]) -> None:
    """Nix's restricted evaluation may read the whole package-set directory, so no secret may be in it."""
    if source.kind is not SourceKind.PATH:
        return
    root = Path(source.argument)
    for name in _SECRET_FILES:
        if env.get(name) and Path(env[name]).expanduser().resolve().is_relative_to(root):
            raise ConfigError(f"{name} lies inside NIXERY_PKGS_PATH={root}, all of which the package set's code "
                              "may read: keep secrets outside it")


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _home_dir(env: Mapping[str, str], xdg: str, fallback: str) -> Path:
    return Path(env.get(xdg) or _home(env) / fallback) / "nixery"


def _platforms(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("NIXERY_PLATFORMS") or ""
    platforms = _names(raw)
    for platform in platforms:
        if platform not in PLATFORM_NAMES:
            raise ConfigError(f"NIXERY_PLATFORMS names {platform!r}; known platforms: {', '.join(PLATFORM_NAMES)}")
    return platforms


def _ignored_variables(env: Mapping[str, str]) -> tuple[str, ...]:
    names = _names(env.get("NIXERY_IGNORE_VARIABLES") or "")
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"NIXERY_IGNORE_VARIABLES names {name!r}, which is not a variable name")
        if name in VARIABLE_NAMES:
            raise ConfigError(f"NIXERY_IGNORE_VARIABLES names {name}, which is Nixery's own variable")
    return names


def _trusted_proxies(env: Mapping[str, str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in (env.get("NIXERY_TRUSTED_PROXIES") or "").split(","):
        if not entry.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"NIXERY_TRUSTED_PROXIES names {entry.strip()!r}, which is not an IP address "
                              "or CIDR network (like 10.0.0.0/8)") from None
    return tuple(dict.fromkeys(networks))


def _gcs(env: Mapping[str, str]) -> Optional[GcsConfig]:
    bucket = env.get("GCS_BUCKET") or env.get("BUCKET")
    if not bucket:
        if env.get("NIXERY_STORAGE_BACKEND") == "gcs":
            raise ConfigError("NIXERY_STORAGE_BACKEND=gcs needs BUCKET or GCS_BUCKET")
        return None
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
        raise ConfigError(f"GCS_BUCKET={bucket!r} is not a valid bucket name")
    if not _gcs_installed():
        variable = "GCS_BUCKET" if env.get("GCS_BUCKET") else "BUCKET"
        raise ConfigError(f"{variable}={bucket!r} needs Nixery's GCS support, which is not installed: "
                          "pip install 'nixery[gcs]'")
    key = env.get("GCS_SIGNING_KEY")
    account = env.get("GCS_SIGNING_ACCOUNT")
    if key and not account:
        raise ConfigError("GCS_SIGNING_KEY needs GCS_SIGNING_ACCOUNT, the e-mail of the service account that owns it")
    if key and not Path(key).is_file():
        raise ConfigError(f"GCS_SIGNING_KEY={key!r} is not a readable file", lasting=False)
    return GcsConfig(bucket=bucket, signing_key=Path(key) if key else None,
                     signing_account=account or None,
                     signed_url_ttl=_int(env, "GCS_SIGNED_URL_TTL", 1, 7 * 24 * 3600),
                     retry_seconds=_int(env, "GCS_RETRY_SECONDS", 1, 600))


_NIX_KEY_RE = re.compile(r"[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}")


def _binary_cache(env: Mapping[str, str]) -> Optional[BinaryCacheConfig]:
    url = env.get("NIXERY_BINARY_CACHE")
    public = env.get("NIXERY_BINARY_CACHE_PUBLIC_KEY")
    secret = env.get("NIXERY_BINARY_CACHE_SECRET_KEY")
    if not url:
        if public or secret:
            raise ConfigError("NIXERY_BINARY_CACHE_PUBLIC_KEY and _SECRET_KEY need NIXERY_BINARY_CACHE")
        return None
    # Nixery adds parameters of its own (secret-key, compression) to the URL.
    if not re.fullmatch(r"(file:///|s3://|https?://|ssh://|ssh-ng://)[A-Za-z0-9._~/:@%+=&?-]+", url) \
            or "secret-key=" in url:
        raise ConfigError(f"NIXERY_BINARY_CACHE={redact_url(url)!r} is not a file:///, s3://, http(s):// "
                          "or ssh:// store URL (without a secret-key parameter)")
    # Paths from the cache are trusted by their signature, never unsigned (require-sigs stays on).
    if not public or not _NIX_KEY_RE.fullmatch(public):
        raise ConfigError("NIXERY_BINARY_CACHE needs NIXERY_BINARY_CACHE_PUBLIC_KEY (name:base64, as "
                          "`nix key convert-secret-to-public` prints it)")
    if secret and not (re.fullmatch(r"/[A-Za-z0-9._/%+-]+", secret) and Path(secret).is_file()):
        raise ConfigError(f"NIXERY_BINARY_CACHE_SECRET_KEY={secret!r} is not a readable file "
                          "at an absolute path of plain characters",
                          lasting=not re.fullmatch(r"/[A-Za-z0-9._/%+-]+", secret))
    return BinaryCacheConfig(url=url, public_key=public, secret_key=Path(secret) if secret else None)


def _gcs_installed() -> bool:
    """Whether the `gcs` extra's client library is importable (found, not imported: it is slow)."""
    try:
        return importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:  # not even the `google` namespace
        return False


def _checked(env: Mapping[str, str], name: str, allowed: tuple[str, ...],
             normalise: Callable[[str], str] = str) -> str:
    value = normalise(env.get(name) or _default(name))
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(allowed)}")
    return value


def _boolean(env: Mapping[str, str], name: str) -> bool:
    value = _checked(env, name, ("true", "false", "1", "0", "yes", "no"), str.lower)
    return value in ("true", "1", "yes")


def load(env: Mapping[str, str] = os.environ) -> Config:
    """Validate the environment into a Config, or raise ConfigError naming the variable."""
    gcs = _gcs(env)
    backend = _checked(env, "NIXERY_STORAGE_BACKEND", ("filesystem", "gcs"))
    if gcs and env.get("NIXERY_STORAGE_BACKEND") == "filesystem":
        raise ConfigError("GCS_BUCKET (or BUCKET) is set but NIXERY_STORAGE_BACKEND=filesystem: "
                          "unset one of them")
    backend = "gcs" if gcs else backend
    storage_path = Path(env.get("STORAGE_PATH") or _home_dir(env, "XDG_DATA_HOME", ".local/share"))
    state_dir = Path(env.get("NIXERY_STATE_DIR") or _home_dir(env, "XDG_CACHE_HOME", ".cache"))
    allow = tuple(c.strip() for c in (env.get("NIXERY_CHANNEL_ALLOW") or "").split(",") if c.strip())
    for channel in allow:
        if not CHANNEL_NAME_RE.fullmatch(channel):
            raise ConfigError(f"NIXERY_CHANNEL_ALLOW names {channel!r}, which is not a channel name")
    template = env.get("NIXERY_CHANNEL_URL_TEMPLATE") or _default("NIXERY_CHANNEL_URL_TEMPLATE")
    if "{rev}" not in template:
        raise ConfigError("NIXERY_CHANNEL_URL_TEMPLATE must contain {rev}")
    if re.search(r"\s", template):  # Nix's allowed-uris, which holds the URL, is space-separated
        raise ConfigError("NIXERY_CHANNEL_URL_TEMPLATE may not contain white space")
    ssh_key = env.get("NIXERY_SSH_KEY")
    if ssh_key and not Path(ssh_key).is_file():
        raise ConfigError(f"NIXERY_SSH_KEY={ssh_key!r} is not a readable file", lasting=False)
    source = _source(env)
    _check_secrets_outside(source, env)
    popularity = env.get("NIX_POPULARITY_URL") or None
    if popularity and not re.match(r"^https?://", popularity) and not Path(popularity).is_file():
        raise ConfigError(f"NIX_POPULARITY_URL={popularity!r} is neither an http(s) URL nor a file", lasting=False)
    eval_memory = _size(env, "NIXERY_EVAL_MEMORY", least=EVAL_MEMORY_LEAST)
    server = ServerConfig(
        port=_int(env, "PORT", 1, 65535),
        listen_address=env.get("NIXERY_LISTEN_ADDRESS") or _default("NIXERY_LISTEN_ADDRESS"),
        workers=_int(env, "NIXERY_WORKERS", 1, 64),
        threads=_int(env, "NIXERY_THREADS", 1, 1024),
        header_timeout=_int(env, "NIXERY_HEADER_TIMEOUT", 1, 3600),
        io_timeout=_int(env, "NIXERY_IO_TIMEOUT", 1, 24 * 3600),
        client_connections=_int(env, "NIXERY_CLIENT_CONNECTIONS", 1, 100_000),
        trusted_proxies=_trusted_proxies(env),
        grace_period=_int(env, "NIXERY_GRACE_PERIOD", 0, 7 * 24 * 3600,
                          default=_int(env, "NIX_TIMEOUT", 1, 24 * 3600)),
    )
    return Config(
        server=server,
        source=source,
        channel_url_template=template,
        channel_allow=allow,
        channel_commits=_channel_commits(env),
        allowed_uris=_allowed_uris(env),
        git=GitConfig(ttl=_int(env, "NIXERY_GIT_TTL", 0, 7 * 24 * 3600), ssh_key=Path(ssh_key) if ssh_key else None,
                      token=env.get("NIXERY_GIT_TOKEN") or None, ssh_dir=_home(env) / ".ssh",
                      ssh_agent=bool(env.get("SSH_AUTH_SOCK"))),
        storage_backend=backend,
        storage_path=storage_path,
        state_dir=state_dir,
        gcs=gcs,
        gc=_gc(env),
        nix_timeout=_int(env, "NIX_TIMEOUT", 1, 24 * 3600),
        nix_store_limit=_size(env, "NIXERY_NIX_STORE_LIMIT"),
        limits=BuildLimits(
            max_builds=_int(env, "NIXERY_MAX_BUILDS", 1, 256,
                            default=min(256, cgroup.build_slots(cgroup.read_limits(), eval_memory))),
            client_builds=_int(env, "NIXERY_CLIENT_BUILDS", 1, 256),
            failure_ttl=_int(env, "NIXERY_FAILURE_TTL", 0, 24 * 3600),
            max_image_size=_size(env, "NIXERY_MAX_IMAGE_SIZE"),
            max_packages=_int(env, "NIXERY_MAX_PACKAGES", 0, MAX_COMPONENTS),
            eval_memory=eval_memory,
            eval_timeout=_int(env, "NIXERY_EVAL_TIMEOUT", 1, 24 * 3600, default=_int(env, "NIX_TIMEOUT", 1, 24 * 3600)),
        ),
        binary_cache=_binary_cache(env),
        popularity_url=popularity,
        layer_budget=_int(env, "NIXERY_LAYER_BUDGET", 1, 120),
        platforms=_platforms(env),
        nix_snapshotter=_boolean(env, "NIXERY_NIX_SNAPSHOTTER"),
        log_level=_checked(env, "NIXERY_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), str.upper),
        log_format=_checked(env, "NIXERY_LOG_FORMAT", ("auto", "json", "text"), str.lower),
        ignored_variables=_ignored_variables(env),
        access_log=_boolean(env, "NIXERY_ACCESS_LOG"),
        hide_details=_boolean(env, "NIXERY_HIDE_DETAILS"),
        allow_unfree=_boolean(env, "NIXERY_ALLOW_UNFREE"),
        auth=auth_settings(env),
    )
