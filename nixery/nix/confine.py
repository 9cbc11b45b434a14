"""What Nix may see while it evaluates and builds code that a client chose.

A tag can select Nix code nobody here wrote (a nixpkgs commit of any fork), and
Nix runs as the service user, who can read the service's secrets. So:

- Evaluation runs in Nix's restricted mode (`restrict-eval`): it may read only
  the paths on its search path (the helper's directory and the package set's
  directory, nothing of NIX_PATH or nix.conf's `nix-path`) and fetch only
  `allowed-uris` (a channel's one tarball URL). `builtins.getEnv` answers "",
  and `builtins.exec` stays off.
- Builds (and any build an evaluation imports from) run in Nix's sandbox: no
  host files, no network except for fixed-output derivations. Where the
  kernel cannot sandbox, Nix falls back to unsandboxed builds
  (`sandbox-fallback`) and the preflight warns (`sandbox_problem`).
- Nix gets an environment built from an allow-list, never the service's own:
  fixed-output builders read the variables they name from Nix's environment
  (`impureEnvVars`), so anything there reaches code with network access.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

# What Nix itself needs to run, find its store, configure itself, fetch through a proxy and
# verify TLS; nothing of Nixery's own configuration, and no credential.
_ALLOWED = re.compile(
    r"PATH|HOME|USER|LOGNAME|TMPDIR|TZ|TZDIR|LANG|LANGUAGE|LC_[A-Z_]+|LOCALE_ARCHIVE"
    r"|XDG_(CACHE_HOME|CONFIG_HOME|DATA_HOME|STATE_HOME|RUNTIME_DIR|CONFIG_DIRS|DATA_DIRS)"
    r"|NIX_(REMOTE|CONFIG|CONF_DIR|USER_CONF_FILES|STORE_DIR|STATE_DIR|LOG_DIR|DATA_DIR|BIN_DIR"
    r"|DAEMON_SOCKET_PATH|SSL_CERT_FILE|IGNORE_SYMLINK_STORE|SSHOPTS)"
    r"|SSL_CERT_FILE|SSL_CERT_DIR|CURL_CA_BUNDLE"
    r"|(http|https|ftp|all|no)_proxy|(HTTP|HTTPS|FTP|ALL|NO)_PROXY")
# Nix's S3 binary caches read AWS credentials from the environment: given only to the commands
# that talk to the shared binary cache, which evaluate and build nothing.
_CACHE_CREDENTIALS = re.compile(r"AWS_[A-Z0-9_]+")
# What evaluation may read besides the package set: the helper expressions' own directory.
NIX_DIR = Path(str(resources.files(__package__)))


def nix_environment(environ: Mapping[str, str], cache_credentials: bool = False) -> dict[str, str]:
    """The environment Nix runs in: the allowed variables of the service's own (plus the AWS
    ones for commands that only copy to or query the binary cache)."""
    return {k: v for k, v in environ.items()
            if _ALLOWED.fullmatch(k) or (cache_credentials and _CACHE_CREDENTIALS.fullmatch(k))}


# Builds in the sandbox whatever nix.conf says; Nix's own sandbox-fallback runs them
# unsandboxed where the kernel has no namespaces for it (the preflight warns then).
# Under a nix-daemon these are the daemon's to decide (a client's `sandbox` is ignored).
BUILD_OPTIONS: tuple[str, ...] = ("--option", "sandbox", "true")
# The preflight's question: does the sandbox work here, without that fallback?
SANDBOX_CHECK_OPTIONS: tuple[str, ...] = (*BUILD_OPTIONS, "--option", "sandbox-fallback", "false")


def evaluation_options(kind: str, argument: str, allowed_uris: Sequence[str] = ()) -> list[str]:
    """Restricted evaluation of a package set: ("path", directory) may read that directory,
    ("tarball", URL) may fetch that one URL (and read what it unpacks to); both may read the
    helper's directory and fetch below `allowed_uris` (NIXERY_ALLOWED_URIS: what a set of the
    operator's pins, a nixpkgs tarball, say). Builds an evaluation imports from are sandboxed too."""
    if kind == "path":
        source, uris = _search_path("nixery-source", Path(argument)), list(allowed_uris)
    elif kind == "tarball":
        source, uris = [], [argument, *allowed_uris]
    else:
        raise ValueError(f"unknown source kind {kind}")
    return ["--option", "restrict-eval", "true", "--option", "allowed-uris", " ".join(uris),
            "--option", "nix-path", "", "--option", "allow-unsafe-native-code-during-evaluation", "false",
            *BUILD_OPTIONS, *_search_path("nixery", NIX_DIR), *source]


def _search_path(name: str, directory: Path) -> list[str]:
    """`-I` entries that let evaluation read `directory`: Nix checks a path both as written and
    with symlinks resolved, so a directory reached through a link (systemd's StateDirectory
    under DynamicUser, a Python environment of links) is given both ways."""
    real = directory.resolve()
    return ["-I", f"{name}={directory}", *(["-I", f"{name}={real}"] if real != directory else [])]


def restriction_hint(nix_log: str) -> str:
    """A sentence for the client when the evaluation failed on the restriction, else ""."""
    if "forbidden in restricted mode" in nix_log:
        return (" (Nixery evaluates package sets in restricted mode: they may read only their own files"
                " and fetch nothing but their own URL)")
    return ""
