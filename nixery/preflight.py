"""Checks, before serving, that a pull will find what it needs.

On a machine that is not set up, the first pull fails deep inside Nix or the
storage with a message that says little to a new user ("the group 'nixbld'
specified in 'build-users-group' does not exist", as a 500). Each check here
turns one such cause into one line that names it and its fix. `nixery
--check-config` and start-up run them all and stop on a fatal one; the rest
are warnings. On a machine that is set up they cost well under a second: the
build check's output path is fixed, so once built it is only looked up.

`--check-config` is a dry run of start-up: an unknown NIXERY_ variable (a typo
that would leave a default in place) is fatal, the port is bound (unless a
running Nixery holds it: the dry run is what comes before restarting that one),
and the package set is evaluated once (a syntax error in it is Nix's message,
not a 500 on the first pull). Start-up evaluates a local set too, and warns.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import pwd
import errno
import http.client
import re
import socket
import subprocess
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from .config import VARIABLE_NAMES, Config, ServerConfig, SourceKind, redact_url
from .mounts import pod_local
from .nix import REQUIRED_COMMANDS, NixError, SourceArgs, first_error_line
from .sources import Resolved
from .nix.confine import SANDBOX_CHECK_OPTIONS, nix_environment
from .storage import Backend, StorageError

DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")
NIX_STATE = Path("/nix/var/nix")
BUILD_CHECK = Path(str(resources.files("nixery.nix").joinpath("preflight.nix")))
BUILD_CHECK_TIMEOUT = 120
# How long a dry run waits for what holds the port to say whether it is a Nixery.
HOLDER_TIMEOUT = 2.0
INSTALL_HINT = "run scripts/install-deps as root, or install Nix (Debian: apt-get install nix-bin)"
# The group whose members may use the daemon's socket in Debian's nix-setup-systemd (the official
# installer's socket is open to all; NixOS's follows nix.settings.allowed-users).
DAEMON_GROUP = "nix-users"

# Variables of Nix and of the platform that look like Nixery's but are not typos.
_NOT_OURS = frozenset({
    "NIX_PATH", "NIX_REMOTE", "NIX_CONFIG", "NIX_CONF_DIR", "NIX_USER_CONF_FILES", "NIX_STORE_DIR",
    "NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_DATA_DIR", "NIX_BIN_DIR", "NIX_SSL_CERT_FILE",
    "NIX_BUILD_CORES", "NIX_BUILD_TOP", "NIX_PROFILES", "NIX_USER_PROFILE_DIR", "NIX_SHOW_STATS",
    "NIX_IGNORE_SYMLINK_STORE", "NIX_DAEMON_SOCKET_PATH", "NIX_PAGER", "NIX_CC", "NIX_LDFLAGS",
    "NIX_CFLAGS_COMPILE", "NIX_HARDENING_ENABLE", "NIX_ENFORCE_PURITY", "NIX_STORE",
    "NIX_BUILD_GROUP_ID", "NIX_FIRST_BUILD_UID",  # the Nix installer's (and scripts/setup-nix's)
    "NIXPKGS_ALLOW_UNFREE", "NIXPKGS_ALLOW_BROKEN", "NIXPKGS_ALLOW_INSECURE", "NIXPKGS_CONFIG",
})


# What the kubelet sets for each Service of a pod's namespace (unless the pod has
# enableServiceLinks: false), after the Service's name: a Service `nixery` gives NIXERY_ names.
_SERVICE_LINK = r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: `fatal` ones stop start-up; `message` names the cause and the fix in one line.
    `lasting`: a mistake in the configuration, which starting again cannot get past (a service
    manager should stop retrying), unlike storage, Nix or a port that may come back."""

    fatal: bool
    message: str
    lasting: bool = False


@dataclasses.dataclass
class SourceCheck:
    """How the checks reach the package source: `resolve` its latest revision (a git remote is
    fetched), and, where `evaluate`, list the top-level names of the set there with `names` (one
    evaluation). `offered` then holds those names, for the start-up line's example. A set that does
    not evaluate is fatal when `strict` (a dry run), else a warning: a running server answers its
    pulls with the reason, and a local set may be fixed while it runs."""

    resolve: Callable[[], Resolved]
    names: Callable[[SourceArgs], Sequence[str]]
    evaluate: bool = False
    strict: bool = False
    offered: Optional[Sequence[str]] = None


def error(message: str, lasting: bool = False) -> Finding:
    return Finding(True, message, lasting)


def warning(message: str) -> Finding:
    return Finding(False, message)


def run(config: Config, env: Mapping[str, str], storage: Backend,
        source: Optional[SourceCheck] = None, dry_run: bool = False) -> list[Finding]:
    """Every finding, cheapest checks first; Nix is only tried once it is known to be there,
    and the package set only evaluated once Nix builds. `dry_run`: `--check-config`."""
    findings = list(misspelt_variables(env, config.ignored_variables))
    findings += port_findings(config.server, dry_run)
    nix = nix_findings(env)
    findings += nix
    findings += storage_findings(storage, config)
    findings += source_findings(config, source if not any(f.fatal for f in nix) else None)
    return findings


def misspelt_variables(env: Mapping[str, str], ignored: Sequence[str] = ()) -> Iterable[Finding]:
    """A typo in a variable name silently leaves the default in place; name the intended one.
    A NIXERY_ name that is not Nixery's stops start-up (it can only be meant for Nixery, unless
    NIXERY_IGNORE_VARIABLES names it); others close to one of Nixery's are warnings, as they
    may well be another program's."""
    links = service_links(env)
    for name in sorted(env):
        if name in VARIABLE_NAMES or name in _NOT_OURS or name in ignored or name in links:
            continue
        close = difflib.get_close_matches(name, sorted(VARIABLE_NAMES), n=1, cutoff=0.8)
        if name.startswith("NIXERY_"):
            meant = f"; did you mean {close[0]}?" if close else " (nixery --help lists them)."
            yield error(f"{name} is not a Nixery variable{meant} If it is meant for another program, "
                        f"list it in NIXERY_IGNORE_VARIABLES", lasting=True)
        elif close:
            yield warning(f"{name} is not a Nixery variable and is ignored; did you mean {close[0]}?")


def port_findings(server: ServerConfig, dry_run: bool = False) -> list[Finding]:
    """Binds the port once and lets it go: a port in use is one line naming PORT, not Gunicorn's
    retries (ten lines over several seconds). What runs there may still take it in between; then
    Gunicorn says so. In a dry run, a Nixery holding the port is only a warning: the check of a
    new configuration comes before restarting the instance that runs (`nixery --check-config &&
    systemctl restart nixery`)."""
    family = socket.AF_INET6 if ":" in server.listen_address else socket.AF_INET
    where = server.bind
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn binds
            s.bind((server.listen_address, server.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE and dry_run and nixery_holds(server):
            return [warning(f"PORT={server.port}: {where} is held by a running Nixery; this configuration can "
                            "serve there once that one stops (a restart)")]
        if e.errno == errno.EADDRINUSE:
            return [error(f"PORT={server.port}: {where} is in use by another program: stop it, or set PORT "
                          "to a free port")]
        if e.errno == errno.EACCES:
            return [error(f"PORT={server.port} is below 1024, which only root (or CAP_NET_BIND_SERVICE) may "
                          "bind: set PORT to 1024 or above")]
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
            return [error(f"NIXERY_LISTEN_ADDRESS={server.listen_address} is not an address of this machine "
                          f"({e.strerror or e}): use 0.0.0.0 (every address) or one that `ip address` lists")]
        return [error(f"PORT={server.port}: cannot bind {where}: {e.strerror or e}")]
    return []


def service_links(env: Mapping[str, str]) -> frozenset[str]:
    """The variables Kubernetes gave this pod for its namespace's Services (in a pod, where the API
    server's own Service is named by KUBERNETES_SERVICE_HOST): those of each SERVICE that has a
    SERVICE_SERVICE_HOST."""
    if "KUBERNETES_SERVICE_HOST" not in env:
        return frozenset()
    services = [name.removesuffix("_SERVICE_HOST") for name in env if name.endswith("_SERVICE_HOST")]
    pattern = re.compile(f"({'|'.join(map(re.escape, services))}){_SERVICE_LINK}")
    return frozenset(name for name in env if pattern.fullmatch(name))


def nixery_holds(server: ServerConfig) -> bool:
    """Whether a Nixery answers on the port: its /metrics has `nixery_build_info` (Prometheus' text)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(server.listen_address, server.listen_address)
    connection = http.client.HTTPConnection(host, server.port, timeout=HOLDER_TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        answer = connection.getresponse()
        body = answer.read(1 << 20)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return answer.status == 200 and re.search(rb"^nixery_build_info\{", body, re.M) is not None


def nix_findings(env: Mapping[str, str]) -> list[Finding]:
    path = env.get("PATH", os.defpath)
    missing = [c for c in REQUIRED_COMMANDS if not _which(c, path)]
    if missing:
        return [error(f"{', '.join(missing)} not found on PATH: {INSTALL_HINT}")]
    local = _local_store_writable()
    if not local:
        daemon = _daemon_state()
        if daemon == "refused":
            user = _user_name()
            group = _socket_group() or DAEMON_GROUP
            named = group if group == DAEMON_GROUP else f"{group} ({DAEMON_GROUP} on Debian)"
            return [error(f"the nix-daemon's socket {DAEMON_SOCKET} refuses {user} (permission denied): "
                          f"as root, add the user to the group {named} that may use it "
                          f"(adduser {user} {group}), then log in again")]
        if daemon == "absent":
            return [error(f"the Nix store is not writable by uid {os.getuid()} and no nix-daemon answers at "
                          f"{DAEMON_SOCKET}: run Nixery as root, or start the nix-daemon (systemctl start "
                          f"nix-daemon; on Debian, apt-get install nix-setup-systemd and add the user to "
                          f"{DAEMON_GROUP})")]
    problem = _build_problem(env)
    if problem:
        return [error(problem)]
    if not local:
        return []  # a nix-daemon builds, and its own `sandbox` setting decides
    problem = sandbox_problem(env)
    return [warning(problem)] if problem else []


def _which(command: str, path: str) -> bool:
    return any(os.access(os.path.join(d, command), os.X_OK) for d in path.split(os.pathsep) if d)


def _local_store_writable() -> bool:
    """As Nix's `auto` store decides: the local store if its state directory (or, on a new
    machine, the place it would be made) is writable."""
    for candidate in (NIX_STATE, *NIX_STATE.parents):
        if candidate.exists():
            return os.access(candidate, os.W_OK)
    return False


def _daemon_state() -> str:
    """"answers", "refused" (the socket or its directory is closed to this user: Nix would then
    not even see the socket and fail on the store's permissions) or "absent"."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(DAEMON_SOCKET))
        except PermissionError:
            return "refused"
        except OSError:
            return "absent"
    return "answers"


def _socket_group() -> Optional[str]:
    """The group owning the socket or, where that cannot be seen, its directory (Debian's is
    root:nix-users, mode 0770)."""
    for path in (DAEMON_SOCKET, DAEMON_SOCKET.parent):
        try:
            gid = path.stat().st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return None


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _build_check(env: Mapping[str, str], options: Sequence[str] = ()) -> Optional[subprocess.CompletedProcess]:
    """nix-build of preflight.nix with `options`; None if it did not end within BUILD_CHECK_TIMEOUT."""
    try:
        return subprocess.run(["nix-build", str(BUILD_CHECK), "--no-out-link",
                               # Whether a cache has the output is not the question: can this machine build?
                               "--option", "substituters", "", *options],
                              capture_output=True, text=True, timeout=BUILD_CHECK_TIMEOUT,
                              stdin=subprocess.DEVNULL, env=nix_environment(env))
    except subprocess.TimeoutExpired:
        return None


def _build_problem(env: Mapping[str, str]) -> Optional[str]:
    """Builds preflight.nix; None if it built, else the line to show."""
    proc = _build_check(env)
    if proc is None:
        return f"Nix did not build a trivial derivation within {BUILD_CHECK_TIMEOUT}s: is the store locked by a stuck build?"
    if proc.returncode == 0:
        return None
    return explain_build_failure(proc.stderr)


def sandbox_problem(env: Mapping[str, str]) -> Optional[str]:
    """Builds preflight.nix again (`--check`) in the sandbox, without Nix's fallback to no
    sandbox; None if it built there, else the line to show. Nixery asks for the sandbox on every
    build, and where the kernel refuses it (some containers) Nix builds without one."""
    proc = _build_check(env, ["--check", *SANDBOX_CHECK_OPTIONS])
    if proc is None:
        return f"Nix did not build a trivial derivation in its sandbox within {BUILD_CHECK_TIMEOUT}s"
    if proc.returncode == 0:
        return None
    return (f"Nix cannot sandbox builds here ({first_error_line(proc.stderr)}), so it builds without "
            "a sandbox: a package set's builds can read every file Nix's build users can read and reach "
            "the network, this server included. Keep secrets readable by the service user only, or run "
            "Nixery where Nix can sandbox (docs/running-in-public.md)")


def explain_build_failure(stderr: str) -> str:
    """Nix's raw text for the usual causes on a machine not set up, as cause and fix."""
    line = first_error_line(stderr)
    if "build-users-group" in stderr and "does not exist" in stderr:
        return ("Nix has no build users (the group named by build-users-group, nixbld by default, "
                "does not exist): run scripts/install-deps as root, which creates them as the Nix "
                "installer does")
    if "sandbox" in line or "namespace" in line:
        return f"Nix cannot set up its build sandbox here ({line}): set sandbox = false in /etc/nix/nix.conf"
    if "Permission denied" in line or "Operation not permitted" in line:
        return f"Nix cannot write its store ({line}): run Nixery as root or start the nix-daemon"
    return f"Nix cannot build a trivial derivation: {line}"


def storage_findings(storage: Backend, config: Config) -> list[Finding]:
    where = (f"STORAGE_PATH={config.storage_path}" if config.storage_backend == "filesystem"
             else f"bucket {config.gcs.bucket if config.gcs else '?'}")
    try:
        storage.check()
    except StorageError as e:
        if "full" in str(e):
            return [warning(f"storage ({where}) is full: new images fail with 503 until space is freed")]
        return [error(f"storage ({where}) cannot be used: {e}")]
    return unshared_storage(config)


def unshared_storage(config: Config) -> list[Finding]:
    """Filesystem storage on a tmpfs or a Kubernetes emptyDir (nixery/mounts.py): a warning, since
    one replica may use it, but a second would answer 404 for the blobs of this one's manifests."""
    if config.storage_backend != "filesystem":
        return []
    local = pod_local(config.storage_path)
    if local is None:
        return []
    return [warning(f"STORAGE_PATH={config.storage_path} is on {local}: its blobs are this instance's alone and "
                    "go with it. Run a single replica there (replicas behind one address would answer 404 for "
                    "each other's layers), or put STORAGE_PATH on a volume that outlives the pod, or share a "
                    "bucket (GCS_BUCKET) between replicas")]


_VARIABLE = {SourceKind.PATH: "NIXERY_PKGS_PATH", SourceKind.GIT: "NIXERY_PKGS_REPO",
             SourceKind.CHANNEL: "NIXERY_CHANNEL"}
# Where Nix's message points: "at /dir/default.nix:2:13:".
_NIX_WHERE = re.compile(r"^\s*at (\S+:\d+:\d+):?\s*$", re.MULTILINE)


def source_findings(config: Config, check: Optional[SourceCheck]) -> list[Finding]:
    """A local set must have a default.nix; a git remote that cannot be reached is a warning (it
    may be down for a while); a set that does not evaluate is fatal in a dry run (`check.strict`),
    except a channel's, whose tarball may fail to download for a while."""
    source = config.source
    if source.kind is SourceKind.PATH and not (Path(source.argument) / "default.nix").is_file():
        return [error(f"NIXERY_PKGS_PATH={source.argument} has no default.nix: point it at the "
                      f"directory whose default.nix is the package set")]
    if check is None or (source.kind is not SourceKind.GIT and not check.evaluate):
        return []
    variable = f"{_VARIABLE[source.kind]}={redact_url(source.argument)}"
    try:
        resolved = check.resolve()
        # A git checkout is exported only to be evaluated: a start-up that serves pinned images
        # from storage must not pay for one.
        args = resolved.args if check.evaluate else None
    except Exception as e:  # any failure to reach it is only a warning: the remote may be down
        reason = getattr(e, "message", None) or str(e) or type(e).__name__
        return [warning(f"{variable} cannot be reached now ({redact_url(reason)}); pulls fail until it can")]
    if args is None:
        return []
    try:
        check.offered = list(check.names(args))
    except NixError as e:
        where = _NIX_WHERE.search(e.log)
        message = first_error_line(e.log) + (f" at {where.group(1)}" if where else "")
        if source.kind is SourceKind.CHANNEL:
            return [warning(f"{variable}: the channel cannot be evaluated now ({message}); pulls fail until it can")]
        if check.strict:
            return [error(f"{variable}: the package set does not evaluate: {message}")]
        return [warning(f"{variable}: the package set does not evaluate: {message}; pulls fail until it does")]
    return []
