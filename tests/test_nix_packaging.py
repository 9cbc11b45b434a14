"""The Nix packaging (default.nix, flake.nix, flake.lock, module.nix) and the documents that
describe it: docs/configuration.md's table, checked against nixery.config.VARIABLES, the README's
deployment entry points, and docs/nix.md's lock and nixpkgs' versions at it.

module.nix is evaluated by nixpkgs' real `lib.evalModules`, taken from NIXPKGS_LIB or
`../shared/nixpkgs-lib` (skipped, with that reason, when neither exists). Only the NixOS
options the module writes into are declared by a stub (tests/nix/nixos-stub.nix), and
nixpkgs' *packages* are stand-ins that nothing builds (tests/nix/fake-pkgs.nix). The flake
is evaluated with the same lib and packages, and shown with `nix flake show`; its
`lib.imageContents` and the package set of its VM test are built for real.

What cannot run here: building the package (it needs nixpkgs' Python packages), the NixOS
VM test (`nix flake check` on a machine with nixpkgs), fetching the locked nixpkgs (no
network), and lib.fileset (Nix 2.14; Debian bookworm has 2.8), which the flake test replaces by
a recorder of the files it is given (tests/test_nix_package_source.py evaluates the real one with
Debian trixie's Nix 2.26, in a container).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from nixery import config as nixery_config
from support import nixpkgs_lib, requirement_names, setup_py_arguments

ROOT = Path(__file__).resolve().parent.parent
NIX_DIR = Path(__file__).resolve().parent / "nix"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SYSTEMS = ("x86_64-linux", "aarch64-linux")
VARIABLES = {v.name: v for v in nixery_config.VARIABLES}

# Every option of services.nixery that sets a variable, by name.
OPTION_VARIABLES = {
    "port": "PORT",
    "listenAddress": "NIXERY_LISTEN_ADDRESS",
    "channel": "NIXERY_CHANNEL",
    "allowedChannels": "NIXERY_CHANNEL_ALLOW",
    "channelCommits": "NIXERY_CHANNEL_COMMITS",
    "allowedUris": "NIXERY_ALLOWED_URIS",
    "pkgsRepo": "NIXERY_PKGS_REPO",
    "pkgsPath": "NIXERY_PKGS_PATH",
    "sshKeyFile": "NIXERY_SSH_KEY",
    "storage.backend": "NIXERY_STORAGE_BACKEND",
    "storage.path": "STORAGE_PATH",
    "storage.limit": "NIXERY_STORAGE_LIMIT",
    "storage.maxAge": "NIXERY_STORAGE_MAX_AGE",
    "storage.gcInterval": "NIXERY_GC_INTERVAL",
    "bucket": "GCS_BUCKET",
    "signing.keyFile": "GCS_SIGNING_KEY",
    "signing.account": "GCS_SIGNING_ACCOUNT",
    "nixTimeout": "NIX_TIMEOUT",
    "maxBuilds": "NIXERY_MAX_BUILDS",
    "clientBuilds": "NIXERY_CLIENT_BUILDS",
    "failureTtl": "NIXERY_FAILURE_TTL",
    "maxImageSize": "NIXERY_MAX_IMAGE_SIZE",
    "maxPackages": "NIXERY_MAX_PACKAGES",
    "evalMemory": "NIXERY_EVAL_MEMORY",
    "evalTimeout": "NIXERY_EVAL_TIMEOUT",
    "binaryCache.url": "NIXERY_BINARY_CACHE",
    "binaryCache.publicKey": "NIXERY_BINARY_CACHE_PUBLIC_KEY",
    "binaryCache.secretKeyFile": "NIXERY_BINARY_CACHE_SECRET_KEY",
    "popularityUrl": "NIX_POPULARITY_URL",
    "layerBudget": "NIXERY_LAYER_BUDGET",
    "platforms": "NIXERY_PLATFORMS",
    "workers": "NIXERY_WORKERS",
    "threads": "NIXERY_THREADS",
    "headerTimeout": "NIXERY_HEADER_TIMEOUT",
    "ioTimeout": "NIXERY_IO_TIMEOUT",
    "clientConnections": "NIXERY_CLIENT_CONNECTIONS",
    "trustedProxies": "NIXERY_TRUSTED_PROXIES",
    "gracePeriod": "NIXERY_GRACE_PERIOD",
    "logLevel": "NIXERY_LOG_LEVEL",
    "accessLog": "NIXERY_ACCESS_LOG",
    "hideDetails": "NIXERY_HIDE_DETAILS",
    "allowUnfree": "NIXERY_ALLOW_UNFREE",
    "auth": "NIXERY_AUTH",
    "htpasswdFile": "NIXERY_HTPASSWD",
    "tokenAuth.realm": "NIXERY_TOKEN_REALM",
    "tokenAuth.service": "NIXERY_TOKEN_SERVICE",
    "tokenAuth.issuer": "NIXERY_TOKEN_ISSUER",
    "tokenAuth.publicKeyFile": "NIXERY_TOKEN_PUBLIC_KEY",
}
# Authentication's variables name an htpasswd file and a PEM key, which the module test's stand-in
# credential files are not: they are left to tests/test_auth.py.
AUTH_VARIABLES = {"NIXERY_AUTH", "NIXERY_HTPASSWD", "NIXERY_TOKEN_REALM", "NIXERY_TOKEN_SERVICE",
                     "NIXERY_TOKEN_ISSUER", "NIXERY_TOKEN_PUBLIC_KEY"}
# Options that set no variable of their own.
OPTIONS_WITHOUT_VARIABLE = {"enable", "package", "openFirewall", "environmentFile", "extraEnvironment",
                            "gcs.credentialsFile", "knownHosts", "nginx.enable", "nginx.virtualHost",
                            "binaryCache.credentialsFile"}
# Variables without an option: the module sets them itself, they are an alias, a secret for
# environmentFile, or rarely changed (extraEnvironment).
VARIABLES_WITHOUT_OPTION = {"NIXERY_STATE_DIR", "BUCKET", "NIXERY_GIT_TOKEN", "NIXERY_CHANNEL_URL_TEMPLATE",
                            "NIXERY_GIT_TTL", "GCS_SIGNED_URL_TTL", "NIXERY_NIX_SNAPSHOTTER", "GCS_RETRY_SECONDS",
                            "NIXERY_LOG_FORMAT", "NIXERY_IGNORE_VARIABLES",
                            # A NixOS store is shared: the system's collection (nix.gc) frees it.
                            "NIXERY_NIX_STORE_LIMIT", "NIXERY_GC_GRACE"}
# Variables the service gets that are not Nixery's.
FOREIGN_VARIABLES = {"NIX_REMOTE", "XDG_CACHE_HOME", "GOOGLE_APPLICATION_CREDENTIALS"}
# Values an option's type is asked about, to compare with what Nixery accepts.
CANDIDATES = [-1, 0, 1, 2, 59, 60, 61, 63, 64, 65, 93, 94, 119, 120, 121, 255, 256, 257, 1023, 1024, 65535,
              65536, 86400, 86401, "filesystem", "gcs", "s3", "DEBUG", "INFO", "WARNING", "ERROR", "TRACE"]


LIB = nixpkgs_lib()
needs_lib = pytest.mark.skipif(LIB is None, reason="nixpkgs' lib not found: set NIXPKGS_LIB, or provide "
                                                   "../shared/nixpkgs-lib (see its README)")


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    # No binary cache here: do not wait for one.
    env["NIX_CONFIG"] = "substituters =\n" + env.get("NIX_CONFIG", "")
    return env


def run(*args: str, **kwargs) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=nix_env(), timeout=300, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def nix_eval(expr: str, **argstr: str | Path):
    """`expr` (a function of the named string arguments) evaluated strictly, to JSON.
    Paths and settings are passed with --argstr, never spliced into Nix source."""
    args = ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "-E", expr]
    for name, value in argstr.items():
        args += ["--argstr", name, str(value)]
    return json.loads(run(*args))


def evaluate_module(settings: dict | None = None, system: dict | None = None, enable: bool = True) -> dict:
    return nix_eval(f"{{ libPath, module, settings, system, candidates }}: import {NIX_DIR}/eval-module.nix "
                    "{ inherit libPath module settings system candidates; }",
                    libPath=LIB, module=ROOT / "module.nix",
                    settings=json.dumps({"enable": enable, **(settings or {})}),
                    system=json.dumps(system or {}), candidates=json.dumps(CANDIDATES))


def module_config(settings: dict | None = None, system: dict | None = None) -> dict:
    return evaluate_module(settings, system)["config"]


def flake_value(selector: str, *, busybox_dir: Path | None = None, **argstr: str):
    """`selector` applied to { flake, outputs, lib, pkgs } of the flake evaluated with the
    real lib and the fake packages (and to the names in `argstr`), as JSON."""
    extra = "".join(f"{name}, " for name in argstr)
    expr = (f"{{ libPath, root, busyboxDir, {extra}... }}: "
            f"let f = import {NIX_DIR}/flake-outputs.nix {{ inherit libPath root busyboxDir; }}; "
            f"in with f; ({selector})")
    return nix_eval(expr, libPath=LIB, root=ROOT, busyboxDir=busybox_dir or "", **argstr)


def store_name(path: str) -> str:
    """/nix/store/HASH-name -> name"""
    return path.rsplit("/", 1)[-1].split("-", 1)[1]


def with_credentials(env: dict[str, str], directory: Path) -> dict[str, str]:
    """What systemd makes of %d: the credentials directory, here filled with stand-in files."""
    directory.mkdir(exist_ok=True)
    for value in env.values():
        if value.startswith("%d/"):
            (directory / value[3:]).write_text("stand-in\n")
    return {k: v.replace("%d", str(directory)) for k, v in env.items()}


@pytest.fixture(scope="session")
def module_options() -> dict[str, dict]:
    if LIB is None:
        pytest.skip("nixpkgs' lib not found")
    return {o["name"]: o for o in evaluate_module()["options"]}


@pytest.fixture(scope="session")
def busybox_dir(tmp_path_factory) -> Path:
    """A directory holding bin/busybox, standing in for pkgsStatic.busybox."""
    found = shutil.which("busybox") or "/bin/busybox"
    directory = tmp_path_factory.mktemp("busybox-static")
    (directory / "bin").mkdir()
    shutil.copy(found, directory / "bin" / "busybox")
    return directory


# ---------------------------------------------------------------- parsing --

def repository_nix_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules", "result"}
    return sorted(p for p in ROOT.rglob("*.nix")
                  if not any(part in skip or part.startswith("result-") for part in p.relative_to(ROOT).parts))


def test_the_packaging_files_exist():
    names = {p.relative_to(ROOT).as_posix() for p in repository_nix_files()}
    assert {"default.nix", "flake.nix", "module.nix", "nixery/nix/helper.nix"} <= names
    assert (ROOT / "flake.lock").is_file()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("path", repository_nix_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_nix_file_parses(path):
    run("nix-instantiate", "--parse", str(path))


# ------------------------------------------------------------ NixOS module --

@needs_lib
def test_every_module_option_is_described(module_options):
    for name, option in module_options.items():
        assert len(option["description"].strip()) > 15, name


@needs_lib
def test_module_options_and_variables_match_by_name(module_options):
    options = set(module_options)
    unknown = options - set(OPTION_VARIABLES) - OPTIONS_WITHOUT_VARIABLE
    assert not unknown, f"options without a known variable (add them to OPTION_VARIABLES): {sorted(unknown)}"
    missing = set(OPTION_VARIABLES) - options
    assert not missing, f"module.nix lacks the options {sorted(missing)}"
    targets = set(OPTION_VARIABLES.values())
    assert len(targets) == len(OPTION_VARIABLES), "two options set the same variable"
    assert targets <= set(VARIABLES), targets - set(VARIABLES)
    unclassified = set(VARIABLES) - targets - VARIABLES_WITHOUT_OPTION
    assert not unclassified, f"variables that no option sets and that are not listed as such: {sorted(unclassified)}"


@needs_lib
def test_each_option_sets_its_variable(tmp_path):
    """Every option of the table, set to a value of its own, lands in its own variable, and
    Nixery's config accepts the result."""
    settings = {
        "port": 9000, "listenAddress": "::", "allowedChannels": ["nixos-24.11", "nixos-unstable"],
        "channelCommits": ["a" * 40, "b" * 40], "allowedUris": ["https://github.com/NixOS/nixpkgs/archive/"],
        "pkgsRepo": "ssh://git@git.example.org/pkgs.git", "sshKeyFile": "/run/keys/ssh",
        "storage": {"backend": "gcs", "path": "/srv/unused", "limit": "20G", "maxAge": "30d", "gcInterval": "15m"},
        "bucket": "my-nixery-layers",
        "signing": {"keyFile": "/run/keys/gcs.pem", "account": "nixery@example.iam.gserviceaccount.com"},
        "nixTimeout": 120, "popularityUrl": "https://example.org/popularity.json", "layerBudget": 60,
        "platforms": ["linux/arm64", "linux/amd64"], "workers": 4, "threads": 16, "logLevel": "DEBUG",
        "accessLog": True, "hideDetails": True, "allowUnfree": True,
        "maxBuilds": 3, "clientBuilds": 4, "failureTtl": 30, "headerTimeout": 7, "ioTimeout": 45,
        "clientConnections": 20, "gracePeriod": 90, "trustedProxies": ["10.0.0.0/8", "::1"],
        "maxImageSize": "3G", "maxPackages": 12, "evalMemory": "512M", "evalTimeout": 40,
        "binaryCache": {"url": "file:///var/cache/nixery-bincache", "publicKey": "nixery-1:AAAA",
                        "secretKeyFile": "/run/keys/cache.secret"},
        "auth": "build", "htpasswdFile": "/run/keys/htpasswd",
        "tokenAuth": {"realm": "https://auth.example.org/token", "service": "nixery.example.org",
                      "issuer": "auth.example.org", "publicKeyFile": "/run/keys/token.pub"},
    }
    expected = {
        "port": "9000", "listenAddress": "::", "allowedChannels": "nixos-24.11,nixos-unstable",
        "channelCommits": f"{'a' * 40},{'b' * 40}", "allowedUris": "https://github.com/NixOS/nixpkgs/archive/",
        "pkgsRepo": "ssh://git@git.example.org/pkgs.git", "sshKeyFile": "%d/ssh-key",
        "storage.backend": "gcs", "storage.path": None, "bucket": "my-nixery-layers",
        "storage.limit": "20G", "storage.maxAge": "30d", "storage.gcInterval": "15m",
        "signing.keyFile": "%d/gcs-signing-key", "signing.account": "nixery@example.iam.gserviceaccount.com",
        "nixTimeout": "120", "popularityUrl": "https://example.org/popularity.json", "layerBudget": "60",
        "platforms": "linux/arm64,linux/amd64", "workers": "4", "threads": "16", "logLevel": "DEBUG",
        "accessLog": "true", "hideDetails": "true", "allowUnfree": "true",
        "maxBuilds": "3", "clientBuilds": "4", "failureTtl": "30", "headerTimeout": "7", "ioTimeout": "45",
        "clientConnections": "20", "gracePeriod": "90", "trustedProxies": "10.0.0.0/8,::1",
        "maxImageSize": "3G", "maxPackages": "12", "evalMemory": "512M", "evalTimeout": "40",
        "binaryCache.url": "file:///var/cache/nixery-bincache", "binaryCache.publicKey": "nixery-1:AAAA",
        "binaryCache.secretKeyFile": "%d/binary-cache-key",
        "auth": "build", "htpasswdFile": "%d/htpasswd", "tokenAuth.realm": "https://auth.example.org/token",
        "tokenAuth.service": "nixery.example.org", "tokenAuth.issuer": "auth.example.org",
        "tokenAuth.publicKeyFile": "%d/token-public-key",
        # The channel is dropped when another source is chosen; the path goes with pkgsPath (below).
        "channel": None, "pkgsPath": None,
    }
    assert set(expected) == set(OPTION_VARIABLES)
    config = module_config(settings)
    assert config["failed"] == []
    env = config["environment"]
    for option, value in expected.items():
        assert env.get(OPTION_VARIABLES[option]) == value, option
    # Nothing else but the module's own variables.
    assert set(env) - {OPTION_VARIABLES[o] for o, v in expected.items() if v is not None} == \
        {"NIXERY_STATE_DIR"} | FOREIGN_VARIABLES - {"GOOGLE_APPLICATION_CREDENTIALS"}
    # pkgsPath, the one source left.
    assert module_config({"pkgsPath": str(tmp_path)})["environment"]["NIXERY_PKGS_PATH"] == str(tmp_path)

    known = {k: v for k, v in with_credentials(env, tmp_path / "credentials").items() if k not in AUTH_VARIABLES}
    loaded = nixery_config.load(known)
    assert loaded.server.port == 9000 and loaded.source.kind == nixery_config.SourceKind.GIT
    assert loaded.gcs.signing_key == tmp_path / "credentials" / "gcs-signing-key"
    assert loaded.binary_cache.secret_key == tmp_path / "credentials" / "binary-cache-key"
    assert (loaded.nix_timeout, loaded.layer_budget, loaded.server.workers, loaded.server.threads) == (120, 60, 4, 16)
    assert loaded.access_log and loaded.hide_details and loaded.allow_unfree
    assert (loaded.limits.max_builds, loaded.limits.client_builds, loaded.limits.failure_ttl, loaded.server.header_timeout, loaded.server.io_timeout,
            loaded.server.client_connections, loaded.server.grace_period) == (3, 4, 30, 7, 45, 20, 90)
    assert (loaded.limits.max_image_size, loaded.limits.max_packages, loaded.limits.eval_memory, loaded.limits.eval_timeout) == \
        (3 << 30, 12, 512 << 20, 40)
    assert [str(network) for network in loaded.server.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert (loaded.gc.storage_limit, loaded.gc.max_age, loaded.gc.interval) == (20 << 30, 30 * 86400, 900)


@needs_lib
def test_module_option_defaults_are_nixerys_defaults(module_options):
    for option, variable in OPTION_VARIABLES.items():
        if variable not in VARIABLES or VARIABLES[variable].default is None:
            continue
        default = module_options[option]["default"]
        rendered = (",".join(default) if isinstance(default, list)
                    else str(default).lower() if isinstance(default, bool) else str(default))
        assert rendered == VARIABLES[variable].default, (
            f"services.nixery.{option} defaults to {default!r}, Nixery's {variable} to {VARIABLES[variable].default!r}")


@needs_lib
def test_module_option_types_accept_what_nixery_accepts(module_options):
    """Over the candidate values, an int or enum option's type accepts exactly what Nixery's
    config accepts for its variable."""
    checked = 0
    for option, variable in OPTION_VARIABLES.items():
        kind = module_options[option]["type"]
        if variable not in VARIABLES or kind not in ("intBetween", "enum"):
            continue
        values = [v for v in CANDIDATES if isinstance(v, int if kind == "intBetween" else str)]
        nixery_accepts = []
        for value in values:
            # The gcs backend needs its bucket (which alone would select it).
            extra = {"GCS_BUCKET": "test-bucket"} if value == "gcs" else {}
            try:
                nixery_config.load({variable: str(value), **extra})
                nixery_accepts.append(value)
            except nixery_config.ConfigError:
                pass
        assert module_options[option]["accepts"] == nixery_accepts, option
        checked += 1
    assert checked >= 7


@needs_lib
def test_module_default_environment_is_valid():
    config = module_config()
    assert config["failed"] == []
    env = config["environment"]
    assert set(env) <= set(VARIABLES) | FOREIGN_VARIABLES, set(env) - set(VARIABLES)
    assert env["NIXERY_STATE_DIR"] == "/var/lib/nixery" and env["STORAGE_PATH"] == "/var/lib/nixery/storage"
    assert env["NIX_REMOTE"] == "daemon"
    loaded = nixery_config.load(env)
    assert loaded.source == nixery_config.PackageSource(nixery_config.SourceKind.CHANNEL, "nixos-unstable")
    # The nix-daemon lets the service user in, on systems that restrict allowed-users.
    assert config["nixSettings"]["extra-allowed-users"] == ["nixery"]
    assert config["serviceConfig"]["LoadCredential"] == [] and config["nginx"] == {}
    assert config["tmpfiles"] == {"10-nixery": {}}


@needs_lib
def test_module_disabled_configures_nothing():
    assert evaluate_module(enable=False)["config"] is None


@needs_lib
def test_module_gcs_with_signing_and_credentials_file(tmp_path):
    config = module_config({
        "storage": {"backend": "gcs"}, "bucket": "my-nixery-layers",
        "signing": {"keyFile": "/run/keys/gcs.pem", "account": "nixery@example.iam.gserviceaccount.com"},
        "gcs": {"credentialsFile": "/run/keys/gcs.json"},
    })
    assert config["failed"] == []
    env = config["environment"]
    assert env["GCS_BUCKET"] == "my-nixery-layers" and "STORAGE_PATH" not in env
    assert env["GCS_SIGNING_KEY"] == "%d/gcs-signing-key"
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "%d/gcs-credentials"
    assert sorted(config["serviceConfig"]["LoadCredential"]) == [
        "gcs-credentials:/run/keys/gcs.json", "gcs-signing-key:/run/keys/gcs.pem"]
    # The key files' own paths are nowhere in the environment (which the Nix store holds).
    assert not any("/run/keys" in value for value in env.values())
    loaded = nixery_config.load(with_credentials(env, tmp_path / "credentials"))
    assert loaded.gcs.bucket == "my-nixery-layers" and loaded.gcs.signing_account.startswith("nixery@")


@needs_lib
def test_module_ssh_repository_with_known_hosts():
    line = "git.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    config = module_config({"pkgsRepo": "git@git.example.org:pkgs.git", "sshKeyFile": "/run/keys/deploy"},
                           system={"programs": {"ssh": {"knownHosts": {
                               "git.example.org": {"publicKey": line.split(" ", 1)[1]},
                               "[git.example.org]:2222": {"hostNames": ["[git.example.org]:2222"],
                                                          "publicKey": "ssh-rsa AAAAB3Nz"},
                               "no-key": {}}}}})
    assert config["failed"] == []
    assert config["environment"]["NIXERY_SSH_KEY"] == "%d/ssh-key"
    assert config["serviceConfig"]["LoadCredential"] == ["ssh-key:/run/keys/deploy"]
    entries = config["tmpfiles"]["10-nixery"]
    assert entries["/var/lib/nixery/.ssh"]["d"] == {"user": "nixery", "group": "nixery", "mode": "0700"}
    # libgit2 reads ~/.ssh/known_hosts of the service user, whose home is the state directory.
    target = entries["/var/lib/nixery/.ssh/known_hosts"]["L+"]["argument"]
    assert config["users"]["users"]["nixery"]["home"] == "/var/lib/nixery"
    assert Path(target).read_text().splitlines() == ["[git.example.org]:2222 ssh-rsa AAAAB3Nz", line]

    # knownHosts given directly replaces the system's.
    own = module_config({"pkgsRepo": "ssh://git@h.example.org/p.git", "knownHosts": ["h.example.org ssh-rsa X"]},
                        system={"programs": {"ssh": {"knownHosts": {"other": {"publicKey": "ssh-rsa Y"}}}}})
    target = own["tmpfiles"]["10-nixery"]["/var/lib/nixery/.ssh/known_hosts"]["L+"]["argument"]
    assert Path(target).read_text() == "h.example.org ssh-rsa X\n"


@needs_lib
def test_module_sources_under_home_are_bound_in():
    config = module_config({"pkgsPath": "/home/alice/packages"})
    service = config["serviceConfig"]
    assert service["BindReadOnlyPaths"] == ["/home/alice/packages"] and service["ProtectHome"] == "tmpfs"
    repo = module_config({"pkgsRepo": "file:///root/pkgs.git"})["serviceConfig"]
    assert repo["BindReadOnlyPaths"] == ["/root/pkgs.git"] and repo["ProtectHome"] == "tmpfs"
    elsewhere = module_config({"pkgsPath": "/srv/packages"})["serviceConfig"]
    assert elsewhere["BindReadOnlyPaths"] == [] and elsewhere["ProtectHome"] is True


@needs_lib
def test_module_binary_cache_is_trusted_by_the_daemon():
    config = module_config({"binaryCache": {"url": "file:///var/cache/nixery-bincache",
                                            "publicKey": "nixery-1:AAAA", "secretKeyFile": "/run/keys/cache.secret"}})
    assert config["failed"] == []
    settings = config["nixSettings"]
    assert settings["extra-trusted-substituters"] == ["file:///var/cache/nixery-bincache"]
    assert settings["extra-trusted-public-keys"] == ["nixery-1:AAAA"]
    # NixOS' own default key stays.
    assert settings["trusted-public-keys"] == ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
    assert config["serviceConfig"]["ReadWritePaths"] == ["/var/cache/nixery-bincache"]
    assert "/var/cache/nixery-bincache" in config["tmpfiles"]["10-nixery"]
    assert config["serviceConfig"]["LoadCredential"] == ["binary-cache-key:/run/keys/cache.secret"]
    remote = module_config({"binaryCache": {"url": "s3://cache?endpoint=storage.googleapis.com",
                                            "publicKey": "nixery-1:AAAA"}})
    assert remote["serviceConfig"]["ReadWritePaths"] == [] and "NIXERY_BINARY_CACHE_SECRET_KEY" not in remote["environment"]


@needs_lib
def test_module_nginx_front():
    config = module_config({"nginx": {"enable": True, "virtualHost": "nixery.example.org"}, "nixTimeout": 300})
    assert config["failed"] == []
    # Nixery itself listens on loopback only.
    assert config["environment"]["NIXERY_LISTEN_ADDRESS"] == "127.0.0.1"
    # nginx (which appends the client's address to X-Forwarded-For) is trusted to name it.
    assert config["environment"]["NIXERY_TRUSTED_PROXIES"] == "127.0.0.1,::1"
    nginx = config["nginx"]
    # The proxy headers are Nixery's location's, not every virtual host's on the machine.
    assert nginx["enable"] is True and "recommendedProxySettings" not in nginx
    host = nginx["virtualHosts"]["nixery.example.org"]
    assert "client_header_timeout 10s;" in host["extraConfig"]
    location = host["locations"]["/"]
    assert location["proxyPass"] == "http://127.0.0.1:8080" and location["recommendedProxySettings"] is True
    assert "proxy_buffering on;" in location["extraConfig"]
    # Evaluation (NIXERY_EVAL_TIMEOUT, by default NIX_TIMEOUT) + build (NIX_TIMEOUT) + 60 s.
    assert "proxy_read_timeout 660s;" in location["extraConfig"]
    own_eval = module_config({"nginx": {"enable": True, "virtualHost": "n"}, "nixTimeout": 300, "evalTimeout": 40})
    assert "proxy_read_timeout 400s;" in own_eval["nginx"]["virtualHosts"]["n"]["locations"]["/"]["extraConfig"]
    ipv6 = module_config({"nginx": {"enable": True, "virtualHost": "n"}, "listenAddress": "::1", "port": 9000})
    assert ipv6["nginx"]["virtualHosts"]["n"]["locations"]["/"]["proxyPass"] == "http://[::1]:9000"


@pytest.mark.parametrize("settings, message", [
    ({"pkgsRepo": "https://example.org/p.git", "pkgsPath": "/srv/p"}, "only one of pkgsRepo and pkgsPath"),
    ({"channel": "nixos-24.11", "pkgsPath": "/srv/p"}, "channel"),
    ({"storage": {"backend": "gcs"}}, "needs services.nixery.bucket"),
    ({"bucket": "my-bucket"}, "only used with storage.backend"),
    ({"storage": {"backend": "gcs"}, "bucket": "my-bucket", "signing": {"keyFile": "/run/k.pem"}},
     "signing.keyFile needs signing.account"),
    ({"signing": {"keyFile": "/run/k.pem", "account": "a@b.c"}}, "only apply to a bucket"),
    ({"signing": {"account": "a@b.c"}}, "only apply to a bucket"),
    ({"gcs": {"credentialsFile": "/run/k.json"}}, "gcs.credentialsFile only applies to a bucket"),
    ({"storage": {"path": "relative/dir"}}, "absolute"),
    ({"sshKeyFile": "/nix/store/00000000000000000000000000000000-key"}, "outside the Nix store"),
    ({"htpasswdFile": "htpasswd"}, "outside the Nix store"),
    ({"environmentFile": "secrets.env"}, "outside the Nix store"),
    ({"binaryCache": {"url": "file:///c"}}, "binaryCache.url and binaryCache.publicKey together"),
    ({"binaryCache": {"secretKeyFile": "/run/k"}}, "needs binaryCache.url"),
    ({"nginx": {"enable": True, "virtualHost": "n"}, "openFirewall": True}, "keep Nixery's own port closed"),
    ({"nginx": {"enable": True}}, "nginx.enable needs nginx.virtualHost"),
    ({"binaryCache": {"url": "file:///c", "publicKey": "k:A", "credentialsFile": "/run/k.env"}},
     "credentialsFile only applies to an s3://"),
    ({"binaryCache": {"url": "s3://c", "publicKey": "k:A", "credentialsFile": "k.env"}}, "outside the Nix store"),
])
@needs_lib
def test_module_assertions(settings, message):
    failed = module_config(settings)["failed"]
    assert any(message in m for m in failed), failed


@needs_lib
@pytest.mark.parametrize("settings, timeout", [
    ({}, 60 + 30), ({"nixTimeout": 120}, 120 + 30), ({"nixTimeout": 120, "gracePeriod": 600}, 600 + 30),
    ({"nixTimeout": 600, "gracePeriod": 10}, 10 + 30),
])
def test_module_stop_timeout_follows_the_grace_period(settings, timeout):
    """systemd waits out Nixery's grace period (gracePeriod, else nixTimeout) and 30 s for
    Gunicorn to reap its workers before it kills: a stop never cuts a build short that Nixery
    would let finish."""
    config = module_config(settings)
    assert config["serviceConfig"]["TimeoutStopSec"] == timeout
    grace = nixery_config.load(config["environment"]).server.grace_period
    assert config["serviceConfig"]["TimeoutStopSec"] == grace + 30
    # Only Gunicorn's master gets SIGTERM: the Nix clients of builds in flight must not
    # (tests/test_nixos_unit.py's stop during a build fails with systemd's default).
    assert config["serviceConfig"]["KillMode"] == "mixed"


@needs_lib
def test_module_open_file_limit():
    """Gunicorn's connections per worker (threads, clientConnections per address) plus builds'
    and uploads' files exceed systemd's soft limit of 1024."""
    assert module_config()["serviceConfig"]["LimitNOFILE"] == 65536


@needs_lib
def test_module_s3_binary_cache_keys_reach_the_daemon():
    """The nix-daemon substitutes, so an s3:// cache's keys go to it as well as to Nixery
    (which copies there); Nixery's own environmentFile stays Nixery's."""
    config = module_config({"binaryCache": {"url": "s3://cache?endpoint=minio.example.org", "publicKey": "k-1:AAAA",
                                            "credentialsFile": "/run/keys/cache-s3.env"},
                            "environmentFile": "/run/keys/nixery.env"})
    assert config["failed"] == []
    assert config["daemon"]["serviceConfig"]["EnvironmentFile"] == ["/run/keys/cache-s3.env"]
    assert config["serviceConfig"]["EnvironmentFile"] == ["/run/keys/cache-s3.env", "/run/keys/nixery.env"]
    assert config["nixSettings"]["extra-trusted-substituters"] == ["s3://cache?endpoint=minio.example.org"]
    # Without the option, the daemon is left as it is.
    assert module_config()["daemon"] is None


@needs_lib
def test_module_collects_the_store():
    """Built images' store paths are only a cache once their layers are stored: NixOS' own
    collection runs, unless the system says otherwise."""
    assert module_config()["nixGc"]["automatic"] is True
    assert module_config(system={"nix": {"gc": {"automatic": False}}})["nixGc"]["automatic"] is False


@needs_lib
def test_module_explicit_default_channel_is_fine():
    assert module_config({"channel": "nixos-24.11"})["failed"] == []


@needs_lib
def test_module_storage_outside_the_state_directory():
    outside = module_config({"storage": {"path": "/srv/nixery"}})
    assert outside["serviceConfig"]["ReadWritePaths"] == ["/srv/nixery"]
    assert outside["tmpfiles"] == {"10-nixery": {"/srv/nixery": {"d": {"user": "nixery", "group": "nixery",
                                                                        "mode": "0750"}}}}
    gcs = module_config({"storage": {"backend": "gcs", "path": "/srv/nixery"}, "bucket": "b-1"})
    assert "STORAGE_PATH" not in gcs["environment"] and gcs["serviceConfig"]["ReadWritePaths"] == []


@needs_lib
def test_module_service_is_hardened_and_uses_the_daemon():
    config = module_config()
    service = config["serviceConfig"]
    assert service["User"] == "nixery" and config["users"]["users"]["nixery"]["isSystemUser"] is True
    assert service["ExecStart"].endswith("-nixery-0.1.0/bin/nixery")
    assert "nix-daemon.socket" in config["after"] and "nix-daemon.socket" in config["requires"]
    expected = {
        "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True, "NoNewPrivileges": True,
        "ProtectKernelTunables": True, "ProtectKernelModules": True, "ProtectKernelLogs": True,
        "CapabilityBoundingSet": [""], "AmbientCapabilities": [], "PrivateUsers": True, "ProcSubset": "pid",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    privileged = module_config({"port": 80})["serviceConfig"]
    assert privileged["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    # A user namespace would take the capability's effect away.
    assert privileged["PrivateUsers"] is False


@needs_lib
def test_module_package_is_this_repositorys_even_when_pkgs_has_a_nixery():
    """nixpkgs' `nixery` is the Go original: the default must not pick it up."""
    expr = (f"{{ libPath, module }}: let lib = import libPath; "
            f"pkgs = import {NIX_DIR}/fake-pkgs.nix {{ inherit lib; }} // {{ nixery = throw \"pkgs.nixery was used\"; }}; "
            f"in (lib.evalModules {{ modules = [ (/. + module) {NIX_DIR}/nixos-stub.nix "
            "{ _module.args.pkgs = pkgs; services.nixery.enable = true; } ]; })"
            ".config.systemd.services.nixery.serviceConfig.ExecStart")
    assert nix_eval(expr, libPath=LIB, module=ROOT / "module.nix").endswith("-nixery-0.1.0/bin/nixery")


# ------------------------------------------------------------------ README --

def section(path: Path, title: str) -> str:
    """The text under the heading `title` (of any level) of a Markdown file, up to the next
    heading of the same or a higher level (lines in code blocks are not headings)."""
    lines = path.read_text().splitlines(keepends=True)
    heading = re.compile(r"^(#+) (.*)\n")
    body, level, fenced = [], None, False
    for line in lines:
        fenced ^= line.lstrip().startswith("```")
        match = None if fenced else heading.match(line)
        if level is None:
            if match and match.group(2) == title:
                level = len(match.group(1))
        elif match and len(match.group(1)) <= level:
            break
        else:
            body.append(line)
    assert level is not None, f"{path.relative_to(ROOT)} has no '{title}' heading"
    return "".join(body)


def variables_table_script():
    """scripts/variables-table, which writes docs/configuration.md's table from VARIABLES."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("variables_table", str(ROOT / "scripts/variables-table"))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_configuration_table_is_variables():
    script = variables_table_script()
    text = section(DOCS / "configuration.md", "Configuration")
    written = script.written_table(text)
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in written.splitlines()[2:]]
    names = [cells[0].strip("`") for cells in rows]
    assert set(names) == nixery_config.VARIABLE_NAMES and len(names) == len(set(names)), (
        f"docs/configuration.md's table and VARIABLES differ: only in the table "
        f"{sorted(set(names) - nixery_config.VARIABLE_NAMES)}, only in VARIABLES "
        f"{sorted(nixery_config.VARIABLE_NAMES - set(names))}; run python3 scripts/variables-table --write")
    assert all(VARIABLES[cells[0].strip("`")].help.replace("|", "\\|") in cells[2] for cells in rows)
    assert written == script.table(), (
        "docs/configuration.md's table is out of date: run python3 scripts/variables-table --write")


def test_readme_deployment_names_the_ways():
    text = section(README, "Deployment")
    assert "nix run" in text
    assert "services.nixery" in text and "nixosModules.default" in text
    assert ".#image" in text and "docker" in text
    assert "deploy/kubernetes" in text and "NIXERY_BINARY_CACHE" in text
    assert "flake.lock" in text


# ------------------------------------------------------------------- flake --

def test_flake_lock_pins_the_input_of_flake_nix():
    lock = json.loads((ROOT / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    node = lock["nodes"][lock["nodes"]["root"]["inputs"]["nixpkgs"]]
    assert node["original"] == {"owner": "NixOS", "repo": "nixpkgs", "ref": "nixos-unstable", "type": "github"}
    assert re.fullmatch(r"[0-9a-f]{40}", node["locked"]["rev"])
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", node["locked"]["narHash"])
    assert node["locked"]["rev"] in (DOCS / "nix.md").read_text(), "docs/nix.md names the locked revision"


@needs_lib
def test_flake_inputs_and_systems():
    assert flake_value("flake.inputs.nixpkgs.url") == "github:NixOS/nixpkgs/nixos-unstable"
    shape = flake_value("builtins.mapAttrs (_: builtins.attrNames) { inherit (outputs) packages apps checks devShells; }")
    for output, per_system in shape.items():
        assert sorted(per_system) == sorted(SYSTEMS), output


@needs_lib
def test_nix_flake_show_lists_the_outputs(tmp_path):
    """`nix flake show` on a copy of the checkout, lock file and all, with the nixpkgs input
    overridden by a local flake of nixpkgs' real lib and the fake packages (the locked
    nixpkgs cannot be fetched here)."""
    nixpkgs = tmp_path / "nixpkgs"
    shutil.copytree(LIB, nixpkgs / "lib")
    shutil.copy(NIX_DIR / "fake-pkgs.nix", nixpkgs)
    (nixpkgs / "flake.nix").write_text(
        "{ outputs = { self }: let lib = import ./lib; in {\n"
        "  inherit lib;\n"
        "  legacyPackages = lib.genAttrs [ \"x86_64-linux\" \"aarch64-linux\" ] (_: import ./fake-pkgs.nix { inherit lib; });\n"
        "}; }\n")
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", "__pycache__", "result*", ".pytest_cache"))
    metadata = json.loads(run("nix", "--extra-experimental-features", "nix-command flakes", "flake", "metadata",
                              "--json", f"path:{checkout}"))
    locked = json.loads((ROOT / "flake.lock").read_text())["nodes"]["nixpkgs"]["locked"]
    assert metadata["locks"]["nodes"]["nixpkgs"]["locked"]["rev"] == locked["rev"]
    shown = json.loads(run("nix", "--extra-experimental-features", "nix-command flakes", "flake", "show", "--json",
                           "--no-write-lock-file", "--override-input", "nixpkgs", f"path:{nixpkgs}",
                           f"path:{checkout}"))
    assert set(shown) >= {"packages", "apps", "checks", "devShells", "nixosModules", "overlays", "lib"}
    for system in SYSTEMS:
        assert shown["packages"][system]["default"]["name"] == "nixery-0.1.0"
        assert set(shown["packages"][system]) == {"default", "nixery", "image"}
        assert set(shown["checks"][system]) == {"package", "nixos", "nixos-hardening"}
        assert shown["apps"][system]["default"]["type"] == "app"
        assert shown["devShells"][system]["default"]["type"] == "derivation"
    assert shown["nixosModules"] == {"default": {"type": "nixos-module"}, "nixery": {"type": "nixos-module"}}


@needs_lib
def test_flake_package_app_overlay_and_module():
    package = flake_value('with outputs.packages."x86_64-linux".default; { inherit pname meta; }')
    assert package["pname"] == "nixery" and package["meta"]["mainProgram"] == "nixery"
    assert "homepage" not in package["meta"] or "nixery.dev" not in package["meta"]["homepage"]
    app = flake_value('outputs.apps."x86_64-linux".default')
    assert app["type"] == "app" and app["program"].endswith("/bin/nixery")
    assert flake_value("(outputs.overlays.default pkgs pkgs).nixery.pname") == "nixery"
    # nixosModules.default is the file itself, as nixpkgs passes modules...
    assert flake_value("toString outputs.nixosModules.default") == str(ROOT / "module.nix")
    # ...so that importing it under both names declares the options once.
    ports = flake_value("(lib.evalModules { modules = [ outputs.nixosModules.default outputs.nixosModules.nixery "
                        f"{NIX_DIR}/nixos-stub.nix {{ _module.args.pkgs = pkgs; services.nixery.enable = true; }} ]; }})"
                        ".config.services.nixery.port")
    assert ports == 8080


def test_locked_nixpkgs_meets_every_runtime_requirement():
    """docs/nix.md's table of nixpkgs' versions at the locked revision (for the revision
    flake.lock names) covers setup.py's runtime requirements as setup.py states them, and
    every version it gives for the lock meets them: nixpkgs' build refuses a package whose
    installed dependencies do not."""
    locked = json.loads((ROOT / "flake.lock").read_text())["nodes"]["nixpkgs"]["locked"]["rev"]
    text = (DOCS / "nix.md").read_text()
    marker = f"<!-- nixpkgs versions at {locked} -->"
    assert marker in text, f"docs/nix.md's table of nixpkgs versions is not for the locked revision {locked}"
    rows = {}
    for line in text.split(marker, 1)[1].strip().splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] not in ("package", "---"):
            rows[canonicalize_name(cells[0])] = (SpecifierSet(cells[1].strip("`")),
                                                 re.findall(r"\d+(?:\.\d+)+", cells[2]))
    setup = setup_py_arguments()
    requirements = [Requirement(r) for r in setup["install_requires"] + setup["extras_require"]["gcs"]]
    assert {canonicalize_name(r.name) for r in requirements} == set(rows)
    for requirement in requirements:
        stated, versions = rows[canonicalize_name(requirement.name)]
        assert stated == requirement.specifier, f"docs/nix.md says {requirement.name}{stated}, setup.py {requirement}"
        assert versions and all(requirement.specifier.contains(v) for v in versions), (
            f"nixpkgs at {locked[:7]} has {requirement.name} {' or '.join(versions)}; setup.py asks {requirement}")


@needs_lib
def test_default_nix_package():
    args = flake_value('removeAttrs outputs.packages."x86_64-linux".default.args [ "passthru" ]')
    setup = setup_py_arguments()
    assert args["pname"] == "nixery" and args["pyproject"] is True and args["version"] == setup["version"]
    # One list: setup.py's requirements, GCS always included (an extra for pip users, if it is one).
    extras = setup.get("extras_require", {})
    runtime = requirement_names(setup["install_requires"] + extras.get("gcs", []))
    assert {store_name(d).removeprefix("python3.13-") for d in args["dependencies"]} == runtime
    assert {"google-cloud-storage", "google-auth"} <= runtime
    # The offline tests run at build time, with the test extra's packages (those that are not
    # dependencies already: the test extra repeats the GCS ones for pip users).
    checks = {store_name(d).removeprefix("python3.13-") for d in args["nativeCheckInputs"]}
    assert checks == (requirement_names(extras["test"]) - runtime) | {"pytestCheckHook"}
    for test in args["enabledTestPaths"]:
        assert (ROOT / test).is_file() and str(ROOT / test) in args["src"]["files"]
    assert args["meta"]["license"]["spdxId"] == "MIT" and (ROOT / "LICENSE").is_file()
    bins = args["makeWrapperArgs"][3].split(":")
    assert args["makeWrapperArgs"][:3] == ["--prefix", "PATH", ":"]
    assert any(b.endswith("-nix/bin") for b in bins) and any(b.endswith("-git/bin") for b in bins)
    assert str(ROOT / "setup.py") in args["src"]["files"] and str(ROOT / "nixery") in args["src"]["files"]
    assert "nixery/nix/helper.nix" in args["postInstall"]
    assert "nixery = nixery.__main__:main" in setup["entry_points"]["console_scripts"]
    # The build imports the server's modules and each subcommand's, as `nixery SUBCOMMAND` runs it.
    subcommands = re.findall(r"from \.(\w+) import main as \w+", (ROOT / "nixery" / "__main__.py").read_text())
    assert len(subcommands) >= 4
    assert {"nixery.app", "nixery.preflight", *(f"nixery.{module}" for module in subcommands)} <= \
        set(args["pythonImportsCheck"])


@needs_lib
def test_nixery_version_is_the_packages():
    version = flake_value('outputs.packages."x86_64-linux".default.version')
    printed = subprocess.run([sys.executable, "-m", "nixery", "--version"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
    assert printed.returncode == 0 and printed.stdout == f"nixery {version}\n"


@needs_lib
def test_build_time_tests_need_no_nix(tmp_path):
    """The tests default.nix runs in the build sandbox pass with nothing on PATH (no Nix, no
    skopeo, no network clients) and an unreachable HOME, as in the sandbox."""
    paths = flake_value('outputs.packages."x86_64-linux".default.args.enabledTestPaths')
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": str(empty), "HOME": "/homeless-shelter", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr


def imported_by_tests() -> set[str]:
    """Top-level modules the tests import that are neither the standard library nor the project's."""
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"nixery"}
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names - local if n not in sys.stdlib_module_names and n != "__future__"}


# A module the tests import -> the nixpkgs Python package that provides it.
IMPORT_PACKAGES = {"pytest": "pytest", "requests": "requests", "falcon": "falcon", "pygit2": "pygit2",
                   "google": "google-cloud-storage", "cryptography": "cryptography", "websocket": "websocket-client",
                   "prometheus_client": "prometheus-client", "gcp_storage_emulator": "gcp-storage-emulator",
                   "networkx": "networkx", "isal": "isal", "gunicorn": "gunicorn", "yaml": "pyyaml",
                   "bcrypt": "bcrypt", "jwt": "pyjwt", "packaging": "packaging",
                   "kubernetes_validate": "kubernetes-validate"}
# Programs the tests run, and the dev shell package that provides each.
TEST_PROGRAMS = {"skopeo": "skopeo", "umoci": "umoci", "sshd": "openssh", "chromium": "chromium",
                 "kubectl": "kubectl", "unshare": "util-linux", "nix": "nix", "git": "git", "busybox": "busybox-static"}


@needs_lib
def test_dev_shell_has_what_the_tests_need():
    shell = flake_value('outputs.devShells."x86_64-linux".default.args')
    python = next(p for p in shell["packages"] if isinstance(p, str) and p.endswith("-python3-env"))
    python_packages = set(flake_value('(builtins.head (builtins.filter (p: p.name == "python3-env") '
                                      'outputs.devShells."x86_64-linux".default.args.packages)).pythonPackages'))
    assert python
    imports = imported_by_tests()
    unmapped = imports - set(IMPORT_PACKAGES)
    assert not unmapped, f"tests import {sorted(unmapped)}: add them to IMPORT_PACKAGES and the package's lists"
    assert {IMPORT_PACKAGES[name] for name in imports} <= python_packages
    tools = {store_name(p) for p in shell["packages"]}
    assert set(TEST_PROGRAMS.values()) <= tools, set(TEST_PROGRAMS.values()) - tools
    assert shell["BUSYBOX"].endswith("-busybox-static/bin/busybox")


@needs_lib
def test_flake_image():
    image = flake_value('outputs.packages."x86_64-linux".image.args')
    names = {store_name(p) for p in image["contents"]}
    assert {"nixery-0.1.0", "nix", "git", "cacert", "bashInteractive", "coreutils", "nixery-container-start"} <= names
    assert image["includeNixDB"] is True
    assert image["config"]["Entrypoint"][0].endswith("-nixery-container-start/bin/nixery-container-start")
    assert "8080/tcp" in image["config"]["ExposedPorts"]


@needs_lib
def test_image_start_script_prepares_the_container(busybox_dir, tmp_path):
    """The image's start-up script, run in a chroot holding only a busybox,
    with Nixery replaced by a command that reports what it was given."""
    script = flake_value('(builtins.head (builtins.filter (p: p.name or "" == "nixery-container-start") '
                         'outputs.packages."x86_64-linux".image.args.contents)).text')
    nixery = "/nix/store/00000000000000000000000000000000-nixery-0.1.0/bin/nixery"
    assert script.count(nixery) == 1
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox_dir / "bin" / "busybox", root / "bin" / "busybox")
    for applet in ("sh", "mkdir", "chmod", "cat", "echo", "printf", "tr"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "start").write_text("set -o errexit -o nounset\n" + script.replace(nixery, "/bin/report"))
    (root / "bin" / "report").write_text('#!/bin/sh\necho "started with $*" > /started\n')
    (root / "bin" / "report").chmod(0o755)
    subprocess.run([chroot, str(root), "/bin/sh", "/start", "--check-config"], check=True,
                   env={"PATH": "/bin"}, timeout=60)
    assert (root / "started").read_text() == "started with --check-config\n"
    conf = (root / "etc" / "nix" / "nix.conf").read_text().splitlines()
    assert "sandbox = false" in conf and "build-users-group =" in conf
    passwd = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()]
    assert ["root", "x", "0", "0", "root", "/root", "/bin/bash"] in passwd
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "group").read_text().splitlines()}
    assert set(groups["nixbld"][3].split(",")) == {e[0] for e in passwd if e[0].startswith("nixbld")}
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    # A second start keeps what is there (a mounted nix.conf, say).
    (root / "etc" / "nix" / "nix.conf").write_text("sandbox = true\n")
    subprocess.run([chroot, str(root), "/bin/sh", "/start"], check=True, env={"PATH": "/bin"}, timeout=60)
    assert (root / "etc" / "nix" / "nix.conf").read_text() == "sandbox = true\n"


@needs_lib
def test_vm_test_script_is_python():
    test = flake_value('with outputs.checks."x86_64-linux".nixos; { inherit name testScript; }')
    compile(test["testScript"], "testScript", "exec")
    assert "skopeo" in test["testScript"] and "/readyz" in test["testScript"]


@needs_lib
def test_vm_hardening_test_evaluates(busybox_dir):
    """tests/nixos/hardening.nix (the flake's nixos-hardening check, which needs nixpkgs to run):
    its script is Python, its node's services.nixery passes the module's assertions, and what
    the script expects of the unit is what the module sets."""
    test = flake_value('with outputs.checks."x86_64-linux".nixos-hardening; { inherit name testScript; }')
    assert test["name"].endswith("nixery-hardening")
    compile(test["testScript"], "testScript", "exec")
    node = ('(outputs.checks."x86_64-linux".nixos-hardening.nodes.machine { inherit pkgs lib; config = { }; })'
            '.services.nixery')
    settings = flake_value(f'removeAttrs ({node}) [ "package" "pkgsPath" ]', busybox_dir=busybox_dir)
    config = module_config({**settings, "pkgsPath": "/srv/pkgs"})
    assert config["failed"] == []
    service = config["serviceConfig"]
    assert "TimeoutStopUSec=2min 30s" in test["testScript"] and service["TimeoutStopSec"] == 150
    assert "KillMode=mixed" in test["testScript"] and service["KillMode"] == "mixed"
    assert "LimitNOFILE=65536" in test["testScript"] and service["LimitNOFILE"] == 65536
    assert config["nginx"]["virtualHosts"]["localhost"]["locations"]["/"]["proxyPass"] == "http://127.0.0.1:8080"
    assert "docker://localhost/hello" in test["testScript"]


@needs_lib
def test_vm_test_package_set_builds_through_image_contents(busybox_dir, tmp_path):
    """The package set of the flake's VM test, as the module gets it, resolved
    and built with the flake's lib (that is, the service's helper)."""
    assert flake_value("toString outputs.lib.helper") == str(ROOT / "nixery" / "nix" / "helper.nix")
    node = '(outputs.checks."x86_64-linux".nixos.nodes.machine { inherit pkgs lib; config = { }; }).services.nixery'
    pkgs_path = flake_value(f"({node}).pkgsPath", busybox_dir=busybox_dir)
    assert pkgs_path.startswith("/nix/store/") and Path(pkgs_path).exists()
    env = module_config({"pkgsPath": pkgs_path})["environment"]
    assert nixery_config.load(env).source.argument == pkgs_path

    resolved = flake_value('outputs.lib.resolve { inherit pkgsPath; packages = [ "hello" "no-such-package" ]; '
                           'optional = [ "cacert" ]; system = builtins.currentSystem; }',
                           busybox_dir=busybox_dir, pkgsPath=pkgs_path)
    assert resolved["unknown"] == ["no-such-package"] and set(resolved["packages"]) == {"hello"}

    expr_file = tmp_path / "contents.nix"
    expr_file.write_text(
        "{ libPath, root, busyboxDir, pkgsPath }:\n"
        f"let f = import {NIX_DIR}/flake-outputs.nix {{ inherit libPath root busyboxDir; }};\n"
        "in f.outputs.lib.imageContents { inherit pkgsPath; packages = [ \"hello\" ]; system = builtins.currentSystem; }\n")
    outputs = run("nix-build", str(expr_file), "--no-out-link", "--argstr", "libPath", str(LIB),
                  "--argstr", "root", str(ROOT), "--argstr", "busyboxDir", str(busybox_dir),
                  "--argstr", "pkgsPath", pkgs_path).split()
    assert outputs == [resolved["packages"]["hello"]] and outputs[0].endswith("-hello-tiny")
    assert run(str(Path(outputs[0]) / "bin" / "hello")).strip() == "Hello from Nixery"
