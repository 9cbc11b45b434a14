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
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional


class ConfigError(ValueError):
    """A variable has a value Nixery cannot use; the message names it."""


class SourceKind(str, enum.Enum):
    CHANNEL = "channel"
    GIT = "git"
    PATH = "path"


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable Nixery reads, as documented in the README."""

    name: str
    default: Optional[str]
    help: str
    secret: bool = False


DEFAULT_CHANNEL = "nixos-unstable"
DEFAULT_CHANNEL_URL = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"

# The single list of variables: `--help`, the README table test and the
# NixOS module test all read it, so none of them can drift from the code.
VARIABLES: tuple[Variable, ...] = (
    Variable("PORT", "8080", "TCP port to listen on."),
    Variable("NIXERY_LISTEN_ADDRESS", "0.0.0.0", "Address to bind to."),
    Variable("NIXERY_CHANNEL", DEFAULT_CHANNEL,
             "nixpkgs channel name or 40-hex commit to build from (the default source)."),
    Variable("NIXERY_CHANNEL_URL_TEMPLATE", DEFAULT_CHANNEL_URL,
             "URL of a nixpkgs tarball; {rev} is replaced by the channel or commit."),
    Variable("NIXERY_CHANNEL_ALLOW", "",
             "Comma-separated channels that a tag may name (empty: only latest and commits)."),
    Variable("NIXERY_PKGS_REPO", None,
             "Git repository (https, ssh, file:// or path) of a package set; tags pick refs."),
    Variable("NIXERY_PKGS_PATH", None, "Local directory holding a package set."),
    Variable("NIXERY_GIT_TTL", "60", "Seconds before a git branch is fetched again."),
    Variable("NIXERY_SSH_KEY", None, "Private key file for ssh git URLs.", secret=True),
    Variable("NIXERY_GIT_TOKEN", None, "Token for https git URLs.", secret=True),
    Variable("NIXERY_STORAGE_BACKEND", "filesystem", "Where blobs live: filesystem or gcs."),
    Variable("STORAGE_PATH", None,
             "Directory for the filesystem backend (default: $XDG_DATA_HOME/nixery or ~/.local/share/nixery)."),
    Variable("NIXERY_STATE_DIR", None,
             "Directory for locks, GC roots and git mirrors (default: $XDG_CACHE_HOME/nixery or ~/.cache/nixery)."),
    Variable("BUCKET", None, "GCS bucket (implies the gcs backend); GCS_BUCKET is the same."),
    Variable("GCS_BUCKET", None, "GCS bucket (implies the gcs backend)."),
    Variable("GCS_SIGNING_KEY", None, "PEM private key file used to sign blob URLs.", secret=True),
    Variable("GCS_SIGNING_ACCOUNT", None, "Service account e-mail that owns GCS_SIGNING_KEY."),
    Variable("GCS_SIGNED_URL_TTL", "300", "Seconds a signed blob URL stays valid."),
    Variable("NIX_TIMEOUT", "60", "Seconds a Nix build may take."),
    Variable("NIX_POPULARITY_URL", None,
             "URL or file of popularity data (JSON: store path name -> count)."),
    Variable("NIXERY_LAYER_BUDGET", "94", "Most store-path layers in an image (the root layer is extra)."),
    Variable("NIXERY_WORKERS", "2", "Gunicorn worker processes."),
    Variable("NIXERY_THREADS", "8", "Threads per worker (builds and downloads in parallel)."),
    Variable("NIXERY_LOG_LEVEL", "INFO", "Log level: DEBUG, INFO, WARNING or ERROR."),
)

VARIABLE_NAMES = frozenset(v.name for v in VARIABLES)


@dataclasses.dataclass(frozen=True)
class PackageSource:
    """Where packages come from; `argument` is a channel, a repository URL or a path."""

    kind: SourceKind
    argument: str


@dataclasses.dataclass(frozen=True)
class GcsConfig:
    bucket: str
    signing_key: Optional[Path]
    signing_account: Optional[str]
    signed_url_ttl: int


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The one description of what lives under NIXERY_STATE_DIR (node-local, never shared
    between instances); every module that keeps state there takes its folder from here."""

    locks: Path  # file locks: one build per image, one git fetch, one writer of the history
    gcroots: Path  # GC roots of builds in progress (the server clears dead workers' roots)
    git: Path  # git mirrors and the checkouts exported from them, a folder per repository
    prometheus: Path  # prometheus_client's multiprocess files, made afresh at each start
    history: Path  # the recent builds and failures the web page and /builds.json show
    build_memo: Path  # unpinned images' digests, for a few seconds after their build

    @classmethod
    def under(cls, root: Path) -> "StateLayout":
        return cls(locks=root / "locks", gcroots=root / "gcroots", git=root / "git",
                   prometheus=root / "prometheus", history=root / "history", build_memo=root / "build-memo")


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated configuration. No defaults here: `load` applies those of `VARIABLES`,
    so there is one place that says what an unset variable means."""

    port: int
    listen_address: str
    source: PackageSource
    channel_url_template: str
    channel_allow: tuple[str, ...]
    git_ttl: int
    ssh_key: Optional[Path]
    git_token: Optional[str] = dataclasses.field(repr=False)
    # Where libgit2 finds the default ssh keys, and whether an SSH agent is there (SSH_AUTH_SOCK).
    ssh_dir: Path
    ssh_agent: bool
    storage_backend: str
    storage_path: Path
    state_dir: Path
    gcs: Optional[GcsConfig]
    nix_timeout: int
    popularity_url: Optional[str]
    layer_budget: int
    workers: int
    threads: int
    log_level: str

    @property
    def state(self) -> StateLayout:
        return StateLayout.under(self.state_dir)

    def summary(self) -> dict[str, object]:
        """The effective configuration with secrets left out, for the start-up log and the web page."""
        return {
            "port": self.port,
            "listen_address": self.listen_address,
            "source": {"kind": self.source.kind.value, "argument": redact_url(self.source.argument)},
            "channel_url_template": redact_url(self.channel_url_template),
            "channel_allow": list(self.channel_allow),
            "git_ttl": self.git_ttl,
            "ssh_key": "<set>" if self.ssh_key else None,
            "git_token": "<set>" if self.git_token else None,
            "storage_backend": self.storage_backend,
            "storage_path": str(self.storage_path) if self.storage_backend == "filesystem" else None,
            "state_dir": str(self.state_dir),
            "gcs_bucket": self.gcs.bucket if self.gcs else None,
            "gcs_signing": bool(self.gcs and self.gcs.signing_key),
            "nix_timeout": self.nix_timeout,
            "popularity_url": redact_url(self.popularity_url) if self.popularity_url else None,
            "layer_budget": self.layer_budget,
            "workers": self.workers,
            "threads": self.threads,
            "log_level": self.log_level,
        }


def redact_url(value: str) -> str:
    """Hide a password or token embedded in a URL (https://user:token@host/...)."""
    return re.sub(r"(//[^/@:]+):[^/@]*@", r"\1:***@", value)


def _int(env: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    raw = env.get(name) or _default(name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range ({lo} to {hi})")
    return value


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
            raise ConfigError(f"NIXERY_PKGS_PATH={given['NIXERY_PKGS_PATH']!r} does not exist")
        return PackageSource(SourceKind.PATH, str(path))
    if "NIXERY_PKGS_REPO" in given:
        url = given["NIXERY_PKGS_REPO"]
        if not re.match(r"^(https?://|ssh://|file://|/|[\w.-]+@[\w.-]+:)", url):
            raise ConfigError(f"NIXERY_PKGS_REPO={redact_url(url)!r} is not an https, ssh, file:// URL or absolute path")
        return PackageSource(SourceKind.GIT, url)
    channel = given.get("NIXERY_CHANNEL", _default("NIXERY_CHANNEL"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", channel):
        raise ConfigError(f"NIXERY_CHANNEL={channel!r} is not a channel name or commit")
    return PackageSource(SourceKind.CHANNEL, channel)


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _home_dir(env: Mapping[str, str], xdg: str, fallback: str) -> Path:
    return Path(env.get(xdg) or _home(env) / fallback) / "nixery"


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
    if bool(key) != bool(account):
        raise ConfigError("GCS_SIGNING_KEY and GCS_SIGNING_ACCOUNT must be set together")
    if key and not Path(key).is_file():
        raise ConfigError(f"GCS_SIGNING_KEY={key!r} is not a readable file")
    return GcsConfig(bucket=bucket, signing_key=Path(key) if key else None,
                     signing_account=account or None,
                     signed_url_ttl=_int(env, "GCS_SIGNED_URL_TTL", 1, 7 * 24 * 3600))


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


def load(env: Mapping[str, str] = os.environ) -> Config:
    """Validate the environment into a Config, or raise ConfigError naming the variable."""
    gcs = _gcs(env)
    backend = "gcs" if gcs else _checked(env, "NIXERY_STORAGE_BACKEND", ("filesystem", "gcs"))
    storage_path = Path(env.get("STORAGE_PATH") or _home_dir(env, "XDG_DATA_HOME", ".local/share"))
    state_dir = Path(env.get("NIXERY_STATE_DIR") or _home_dir(env, "XDG_CACHE_HOME", ".cache"))
    allow = tuple(c.strip() for c in (env.get("NIXERY_CHANNEL_ALLOW") or "").split(",") if c.strip())
    for channel in allow:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", channel):
            raise ConfigError(f"NIXERY_CHANNEL_ALLOW names {channel!r}, which is not a channel name")
    template = env.get("NIXERY_CHANNEL_URL_TEMPLATE") or _default("NIXERY_CHANNEL_URL_TEMPLATE")
    if "{rev}" not in template:
        raise ConfigError("NIXERY_CHANNEL_URL_TEMPLATE must contain {rev}")
    ssh_key = env.get("NIXERY_SSH_KEY")
    if ssh_key and not Path(ssh_key).is_file():
        raise ConfigError(f"NIXERY_SSH_KEY={ssh_key!r} is not a readable file")
    popularity = env.get("NIX_POPULARITY_URL") or None
    if popularity and not re.match(r"^https?://", popularity) and not Path(popularity).is_file():
        raise ConfigError(f"NIX_POPULARITY_URL={popularity!r} is neither an http(s) URL nor a file")
    return Config(
        port=_int(env, "PORT", 1, 65535),
        listen_address=env.get("NIXERY_LISTEN_ADDRESS") or _default("NIXERY_LISTEN_ADDRESS"),
        source=_source(env),
        channel_url_template=template,
        channel_allow=allow,
        git_ttl=_int(env, "NIXERY_GIT_TTL", 0, 7 * 24 * 3600),
        ssh_key=Path(ssh_key) if ssh_key else None,
        git_token=env.get("NIXERY_GIT_TOKEN") or None,
        ssh_dir=_home(env) / ".ssh",
        ssh_agent=bool(env.get("SSH_AUTH_SOCK")),
        storage_backend=backend,
        storage_path=storage_path,
        state_dir=state_dir,
        gcs=gcs,
        nix_timeout=_int(env, "NIX_TIMEOUT", 1, 24 * 3600),
        popularity_url=popularity,
        layer_budget=_int(env, "NIXERY_LAYER_BUDGET", 1, 120),
        workers=_int(env, "NIXERY_WORKERS", 1, 64),
        threads=_int(env, "NIXERY_THREADS", 1, 256),
        log_level=_checked(env, "NIXERY_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), str.upper),
    )
