"""Calls to Nix: resolve names with the helper, build them, read the closure.

User input reaches Nix only as `--argstr` values (lists as JSON), never as
Nix source. stdout and stderr are read together (stderr line by line, so that
Nix's progress reaches the log as it happens) and the whole process group is
killed on timeout, so a chatty or stuck Nix cannot hang a worker. Nix runs
confined (`confine`): restricted evaluation, sandboxed builds and an allow-listed
environment, so neither the package set's code nor the service user's shell
(nixpkgs reads NIXPKGS_ALLOW_* itself) changes what is served or sees secrets.

An evaluation runs the package set's code, which a tag may choose: it is
bounded in memory and time (`EvalBounds`), and past a bound it is refused as
the request's fault (`EvaluationLimit`), not the instance's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

from ..config import BinaryCacheConfig, format_size, redact_url
from ..layers import StorePath
from . import cache as binary_cache
from .processes import TERM_GRACE_SECONDS, recorded, stop_recorded
from .output import KeptLines, lines
from .confine import BUILD_OPTIONS, NIX_DIR, evaluation_options, nix_environment, restriction_hint

log = logging.getLogger(__name__)

HELPER = Path(str(resources.files(__package__).joinpath("helper.nix")))
PACKAGES = Path(str(resources.files(__package__).joinpath("packages.nix")))
# Paths per command line when a list of store paths may be long (ARG_MAX is about 2 MB).
ARGV_CHUNK = 5000
# The commands an instance needs on PATH, as readiness (/readyz) and the preflight check both ask:
# builds run nix-instantiate, nix-store and nix, the preflight check nix-build. Every Nix 2
# installs nix-build, nix-instantiate and nix-store as names of the one `nix` program, so these
# three stand for all four.
REQUIRED_COMMANDS = ("nix-instantiate", "nix-build", "nix")
# The most an evaluation may print (its JSON answer): the names of all of nixpkgs take tens of MB;
# a set's code could print gigabytes, which the server would hold (and parse) whole.
EVAL_OUTPUT_MAX = 256 << 20
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Nix's own progress lines on stderr (what it builds, fetches or copies), as opposed to builders' output.
PROGRESS_RE = re.compile(r"(building '|copying (path|\d+ paths)|these \d+ (derivations|paths) will be|"
                         r"downloading '|fetching |querying |unpacking |evaluating |warning: )")
# A derivation's own builder exited non-zero: the same inputs fail the same way, so the request is at
# fault. A builder killed by a signal ("failed due to signal 9") is not: the machine did that.
_BUILDER_FAILED = re.compile(r"^(?:error: )?builder for '(/nix/store/[^']+\.drv)' failed with exit code.*$", re.M)
# Nix's --timeout or --max-silent-time stopped a builder.
_BUILDER_TIMED_OUT = re.compile(
    r"^(?:error: )?building of '(/nix/store/[^'!]+\.drv)[^']*' from \.drv file timed out.*$", re.M)
# What Nix says when an allocation fails (Boehm GC's out-of-memory handler, or a C++ allocation).
_OUT_OF_MEMORY = re.compile(r"error: out of memory|std::bad_alloc")
# Failures of an evaluation that are not the package set's code: a download, the daemon, the
# machine's resources. Each with what the operator should do (the log says it).
_NOT_THE_CODE = (
    (re.compile(r"unable to download|cannot download|Couldn't resolve host|Couldn't connect|HTTP error \d+"),
     "a download failed: check that this machine reaches the URL Nix names (nix_log), and the URL itself"),
    (re.compile(r"cannot connect to socket|cannot open connection to remote store|Connection reset|Broken pipe"),
     "Nix could not talk to its daemon: check that nix-daemon runs and that the service user may use it"),
    (re.compile(r"No space left on device|Disk quota exceeded"),
     "the Nix store's disk is full: free space (nix-collect-garbage) or grow the disk"),
    (re.compile(r"Cannot allocate memory|Too many open files|Resource temporarily unavailable|"
                r"Permission denied|database is locked|SQLite (database|statement|error)|executing SQLite"),
     "Nix failed for a reason of this machine (nix_log): fix that, the next pull retries"),
    (re.compile(r"due to signal|killed by signal"),
     "a builder was killed (the kernel's out-of-memory killer? see the kernel log); the next pull retries"),
    (re.compile(r"is not installed or not on PATH"), "install Nix, or put it on the service's PATH"),
)
# Nix's word that a URL is not there ("unable to download 'URL': HTTP error 404").
_MISSING_DOWNLOAD = re.compile(r"unable to download '([^']*)': HTTP error 4(?:04|10)\b")
# What Nix quotes in a message: a name or path ('...'), a string value ("..."), another value («...»).
_QUOTED = re.compile(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|«[^»\n]*»")
# A line of the code Nix quotes under an error ("      2| x = 1;", "       |   ^").
_QUOTED_CODE = re.compile(r"^\s*\d*\|")
# Where Nix points in the code ("at /nix/store/...-source/pkgs/foo.nix:3:5:").
_POSITION = re.compile(r"^\s*at (/\S+):(\d+):(\d+):?\s*$", re.MULTILINE)
_STORE_PREFIX = re.compile(r"^/nix/store/[0-9a-z]{32}-[^/]+/")
# Names `explain` asks Nix about, at most: one evaluation each, only for failed requests.
EXPLAINED_MAX = 3
# Who hears the stderr lines of the Nix processes this thread runs (the builder, for the log and the page).
_listener: contextvars.ContextVar[Optional[Callable[[str], None]]] = contextvars.ContextVar("nix_listener",
                                                                                            default=None)


class NixError(Exception):
    """Nix failed; `reason` is one line for the client, `log` the whole story for the server log."""

    def __init__(self, reason: str, log_text: str = "", timed_out: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.log = log_text
        self.timed_out = timed_out


class DerivationFailed(NixError):
    """The build of one derivation did not finish; `derivation` is its store path (.drv), `line`
    Nix's own line about it (by default the log's first error line)."""

    def __init__(self, reason: str, log_text: str, derivation: str, line: str = ""):
        super().__init__(reason, log_text)
        self.derivation = derivation
        self.line = line or first_error_line(log_text)


class BuildFailed(DerivationFailed):
    """A derivation's builder failed: the request will fail the same way again (a 4xx)."""


class BuildTimedOut(DerivationFailed):
    """A derivation's builder ran or stayed silent longer than NIX_TIMEOUT (Nix stopped it): the
    same derivation meets the same bound again, so the request is refused with the reason (a 4xx)."""


class EvaluationLimit(NixError):
    """An evaluation went past this instance's bound on its memory or time (`variable` names it).
    The package set's code for this revision and these names is what costs it, so the request
    will meet the same bound again: it is refused, as an image over the size limit is."""

    def __init__(self, reason: str, log_text: str, variable: str):
        super().__init__(reason, log_text)
        self.variable = variable


@dataclasses.dataclass(frozen=True)
class EvalBounds:
    """What one evaluation of the package set may take: `memory` bytes of data (RLIMIT_DATA, which
    bounds Boehm GC's heap and malloc alike; 0: no bound) and `seconds`."""

    memory: int = 0
    seconds: int = 60


class EvaluationFailed(NixError):
    """The package set's own code does not evaluate (a syntax error, an undefined variable, a throw
    outside any package), as opposed to Nix or the machine failing (a download, the daemon, the
    disk). `pinned`: the revision is fixed (a commit), so every retry fails the same way and the
    client is told why (a 4xx); a local directory or a channel name is the operator's to fix (a 5xx)."""

    def __init__(self, reason: str, log_text: str, pinned: bool = False):
        super().__init__(reason, log_text)
        self.pinned = pinned


class RevisionMissing(NixError):
    """The package set's own tarball URL answered 404 or 410: the revision it names is not there
    (a commit of nobody's, or a typo), and no retry changes that."""


class Forbidden(NixError):
    """The evaluation reached outside what it may read or fetch (`confine`): the package set's
    code asked for a file or URL of the server, and will ask again (a 4xx)."""


class UnknownPackages(Exception):
    """Names the package set does not have. `stopped_in` maps each to the path of the set its
    lookup stopped in ("" for the top level), `listed` holds the names of those sets that
    the evaluation listed, and `suggestions` is filled in by whoever holds the name index."""

    def __init__(self, names: Sequence[str], stopped_in: Optional[Mapping[str, str]] = None,
                 listed: Optional[Mapping[str, Sequence[str]]] = None, declared_by: str = ""):
        """`declared_by`: the declared image whose declaration names them ("" for an image name's)."""
        super().__init__(", ".join(names))
        self.names = tuple(names)
        self.declared_by = declared_by
        self.stopped_in = dict(stopped_in or {})
        self.listed = dict(listed or {})
        self.suggestions: dict[str, list[str]] = {}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A name the set has but will not give as a package. `kind` is nixpkgs' reason:
    removed (the set's own message in `detail`), unfree (the licence), broken, insecure
    (the known issues), unsupported (the system), not-a-package (what it is instead), or
    fails (Nix's message)."""

    name: str
    kind: str
    detail: str


class UnavailablePackages(Exception):
    """Some names cannot be served, for the set's own reasons; `unknown` holds any that it lacks."""

    def __init__(self, problems: Sequence[Problem], unknown: Optional[UnknownPackages] = None):
        super().__init__("; ".join(f"{p.name}: {p.kind}" for p in problems))
        self.problems = tuple(problems)
        self.unknown = unknown


class UnsupportedSystem(Exception):
    """The package set cannot build for the image's system (a plain set asked for arm64); the message says why."""

    def __init__(self, reason: str, system: str):
        super().__init__(reason)
        self.system = system


class Resolved(dict):
    """Name -> output path of every name that resolved, carrying what builds them:
    `derivations` maps each name to "<drv>!<output>", which `nix-store --realise`
    builds without evaluating the package set a second time. `declared` is the set's
    declaration of the image (raw data of the set's code, None when the name is not declared);
    `main_program` the `meta.mainProgram` of an image of one package, if the set gives one."""

    def __init__(self, packages: Mapping[str, str], derivations: Mapping[str, str],
                 declared: object = None, main_program: object = None):
        super().__init__(packages)
        self.derivations = dict(derivations)
        self.declared = declared
        self.main_program = main_program


@dataclasses.dataclass(frozen=True)
class Closure:
    # Requested package name -> its output path, in the order the image lists them.
    packages: Mapping[str, str]
    # Every store path of the runtime closure.
    paths: Mapping[str, StorePath]


@dataclasses.dataclass(frozen=True)
class SourceArgs:
    """What the helper imports: ("path", directory) or ("tarball", URL)."""

    kind: str
    argument: str
    description: str


def first_error_line(text: str) -> str:
    """Nix's own one-line summary ("error: builder for ... failed ..."), or the last line."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.startswith("error:") and len(line) > len("error:"):
            return line[:500]
    return (lines[-1] if lines else "nix failed without output")[:500]


@contextlib.contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """Within the block, `listener` hears every stderr line of the Nix processes this thread runs."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


class _Process:
    """A Nix process in its own session whose stdout is collected while stderr is read line by line."""

    def __init__(self, args: Sequence[str], listener: Optional[Callable[[str], None]], cache_credentials: bool,
                 memory: int = 0, output: int = 0):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=nix_environment(os.environ, cache_credentials))
        if memory:
            # Set from here, as the process starts: a preexec_fn may deadlock a threaded server's fork.
            # Nix has not allocated anything worth counting yet, and what it forks later inherits it.
            try:
                resource.prlimit(self.proc.pid, resource.RLIMIT_DATA, (memory, memory))
            except ProcessLookupError:
                pass  # already gone: it allocates nothing more
            except OSError as e:  # not left to run unbounded
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise NixError(f"cannot bound the memory of {args[0]} (NIXERY_EVAL_MEMORY): {e}") from None
        self.listener = listener
        self.out = bytearray()
        self.output_max = output  # 0: no bound; past it Nix is stopped and `overflowed`
        self.overflowed = False
        self.err = KeptLines()
        self.readers = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout
        for chunk in iter(lambda: self.proc.stdout.read(65536), b""):
            if self.overflowed:
                continue  # read to the end, so that Nix is not blocked writing while it stops
            self.out += chunk
            if self.output_max and len(self.out) > self.output_max:
                self.overflowed = True
                self.out = bytearray()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)

    def _read_err(self) -> None:
        assert self.proc.stderr
        for line in lines(self.proc.stderr):
            self.err.add(line)
            if self.listener:
                try:
                    self.listener(redact_url(_ANSI.sub("", line).rstrip()))
                except Exception:  # a listener's fault must not lose Nix's output
                    log.exception("nix progress listener failed")

    def finish(self, timeout: Optional[float]) -> None:
        """Waits for the process and its output; raises TimeoutExpired (the process still runs)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()) + 1)

    def stop(self) -> None:
        """SIGTERM first: Nix then stops its builders, which run in sessions of their own
        and would outlive a SIGKILL'd client. SIGKILL the group if it does not exit."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.finish(TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.finish(TERM_GRACE_SECONDS)

    @property
    def stderr(self) -> str:
        # Nix quotes the URLs it fails to download, credentials and all.
        return redact_url(self.err.text())


class Nix:
    """Runs Nix for one service; `on_invoke` hears each command's name (the metrics count them).
    `allow_unfree` is the package set's `config.allowUnfree` (NIXERY_ALLOW_UNFREE), `allowed_uris`
    what its evaluation may fetch besides a channel's tarball (NIXERY_ALLOWED_URIS)."""

    def __init__(self, timeout: int, gcroot_dir: Path, on_invoke: Optional[Callable[[str], None]] = None,
                 cache: Optional[BinaryCacheConfig] = None, allow_unfree: bool = False,
                 allowed_uris: Sequence[str] = (), eval_bounds: Optional[EvalBounds] = None):
        self.timeout = timeout
        self.eval_bounds = eval_bounds or EvalBounds(seconds=timeout)
        self.gcroot_dir = gcroot_dir
        self.on_invoke = on_invoke
        self.cache = cache
        self.allow_unfree = allow_unfree
        self.allowed_uris = tuple(allowed_uris)

    def _run(self, args: Sequence[str], what: str, timeout: Optional[float] = -1,
             cache_credentials: bool = False, memory: int = 0, told: Callable[[str], str] = str,
             output: int = 0) -> str:
        """Runs one Nix command; `timeout` seconds (default: the build timeout; None: no limit,
        for commands that Nix bounds itself) before its process group is stopped, and at most
        `memory` bytes of data (0: no bound).
        `cache_credentials`: the command only talks to the binary cache, and gets its credentials.
        `told`: Nix's output as an error's reason may quote it (the log keeps it whole); `output`:
        the most bytes it may print on stdout (0: no bound), past which it is stopped."""
        timeout = self.timeout if timeout == -1 else timeout
        if self.on_invoke:
            self.on_invoke(args[0])
        log.debug("running nix", extra={"argv": list(args)})
        try:
            process = _Process(args, _listener.get(), cache_credentials, memory, output)
        except FileNotFoundError:
            raise NixError(f"{args[0]} is not installed or not on PATH") from None
        # Recorded while it runs: if this worker is killed, the master stops it (nixery/nix/processes.py).
        with recorded(self.gcroot_dir, process.proc.pid):
            try:
                process.finish(timeout)
            except subprocess.TimeoutExpired:
                process.stop()
                raise NixError(f"{what} timed out after {timeout}s", process.stderr, timed_out=True) from None
        stderr = process.stderr
        if process.overflowed:
            raise EvaluationLimit(f"{what} printed more than {format_size(output)}, this instance's limit",
                                  stderr, "output")
        if process.proc.returncode < 0:  # the kernel's out-of-memory killer, an operator: not the command's doing
            stderr += f"\n{args[0]} was killed by signal {-process.proc.returncode}"
        if process.proc.returncode != 0:
            shown = told(stderr)
            verdict = _derivation_verdict(shown)
            if verdict:
                kind, line, derivation = verdict
                raise kind(f"{what} failed: {line}", stderr, derivation, line)
            hint = restriction_hint(stderr)
            raise (Forbidden if hint else NixError)(f"{what} failed: {first_error_line(shown)}{hint}", stderr)
        return bytes(process.out).decode()

    def _evaluate(self, args: Sequence[str], what: str, source: SourceArgs) -> str:
        """Runs one evaluation of the package set within `eval_bounds`; raises EvaluationLimit
        naming the bound it went past."""
        bounds = self.eval_bounds
        # Whatever fails, its reason may reach a client: the set's code can name the server's paths.
        what = in_the_set(what, args)
        try:
            return self._run(args, what, bounds.seconds, memory=bounds.memory, told=lambda text: in_the_set(text, args),
                             output=EVAL_OUTPUT_MAX)
        except EvaluationLimit:
            raise
        except NixError as e:
            if e.timed_out:
                raise EvaluationLimit(f"{what} took longer than {bounds.seconds}s, this instance's limit "
                                      "(NIXERY_EVAL_TIMEOUT)", e.log, "NIXERY_EVAL_TIMEOUT") from None
            if bounds.memory and _OUT_OF_MEMORY.search(e.log):
                raise EvaluationLimit(f"{what} needed more than {format_size(bounds.memory)} of memory, this "
                                      "instance's limit (NIXERY_EVAL_MEMORY)", e.log, "NIXERY_EVAL_MEMORY") from None
            if type(e) is NixError and _tarball_missing(source, e.log):
                raise RevisionMissing(e.reason, e.log) from None
            if type(e) is NixError and e.log and (_machine_fault(final_error(e.log)) is None or self._thrown(args)):
                raise EvaluationFailed(e.reason + code_position(e.log, args), e.log) from None
            raise

    def _thrown(self, args: Sequence[str]) -> bool:
        """Whether the evaluation `args` failed of a `throw` or `assert` of the set's code, which
        `builtins.tryEval` catches, unlike Nix's own failures (a download, the daemon, the disk):
        asked only when Nix's message reads like one of those, since the set's code can throw the
        same words. The same file (the helper's or packages.nix), attribute, arguments, confinement
        and bounds, deep-forced."""
        files = [a for a in args if a in (str(HELPER), str(PACKAGES))]
        if not files:
            return False
        # The file and the attribute arrive as data, as every argument does.
        probe = ("{ ... }@args: let value = import (/. + args.nixeryFile) (removeAttrs args "
                 "[ \"nixeryFile\" \"nixeryAttribute\" ]); in (builtins.tryEval (builtins.deepSeq "
                 "(if args.nixeryAttribute == \"\" then value else value.${args.nixeryAttribute}) true)).success")
        attribute = args[args.index("-A") + 1] if "-A" in args else ""
        rest = [a for i, a in enumerate(args) if a != "-A" and (i == 0 or args[i - 1] != "-A")]
        at = rest.index(files[0])
        rest[at:at + 1] = ["-E", probe, "--argstr", "nixeryFile", files[0], "--argstr", "nixeryAttribute", attribute]
        try:
            return self._run(rest, "checking what failed", self.eval_bounds.seconds,
                             memory=self.eval_bounds.memory, output=1024).strip() == "false"
        except NixError:
            return False

    def systems(self) -> Optional[tuple[str, ...]]:
        """The systems this Nix builds for, its own first: its `system`, `extra-platforms` and the
        systems of its remote `builders`; None when Nix cannot say (then nothing is refused before
        evaluation). Read once at start-up (the default of NIXERY_PLATFORMS, and refusing
        `arm64/...` at once on an instance that cannot build it)."""
        try:
            raw = self._run(["nix", "--extra-experimental-features", "nix-command", "show-config", "--json"],
                            "reading Nix's settings")
            settings = json.loads(raw)

            def value(name: str) -> object:  # Nix 2.8 wraps each value as {"value": ...}; later Nix may not.
                entry = settings.get(name)
                return entry.get("value") if isinstance(entry, dict) else entry

            extra = value("extra-platforms") or []
            systems = [str(value("system")), *(extra.split() if isinstance(extra, str) else map(str, extra))]
            builders = str(value("builders") or "")
        except (NixError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cannot read the systems Nix builds for", extra={"reason": str(e)})
            return None
        return tuple(dict.fromkeys([*systems, *sorted(remote_builder_systems(builders))]))

    def _helper_args(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
                     system: Optional[str]) -> list[str]:
        """helper.nix's arguments; without a `system`, Nix's own (builtins.currentSystem)."""
        return [*evaluation_options(source.kind, source.argument, self.allowed_uris), str(HELPER),
                "--argstr", "packages", json.dumps(list(names)),
                "--argstr", "optional", json.dumps(list(optional)),
                "--argstr", "srcType", source.kind,
                "--argstr", "srcArgs", source.argument,
                *(["--argstr", "system", system] if system else []),
                "--argstr", "allowUnfree", "true" if self.allow_unfree else "false"]

    def resolve(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
                system: str, listed: Sequence[str] = (), declarable: str = "") -> Resolved:
        """Name -> output path for every name that resolved; raises UnknownPackages listing all others
        (with the names of the sets they stopped in, except the `listed` ones the caller holds),
        UnavailablePackages for names the set refuses (nixpkgs' reasons), UnsupportedSystem when
        the set cannot build for `system` at all.

        The image's one evaluation of the package set: read-write mode writes the derivations
        to the store, and `build` realises them. Only a name that fails with an error of its own
        (an alias that throws "has been removed") costs one more evaluation, to read that error.

        `declarable`: the image's name when the set may declare it (nixery/declared.py); when it
        does, the declaration's packages are resolved instead of `names`."""
        raw = self._evaluate(["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "-A", "resolve",
                              *self._helper_args(names, optional, source, system),
                              "--argstr", "listed", json.dumps(list(listed)), "--argstr", "image", declarable],
                             f"evaluating {source.description}", source)
        data = json.loads(raw)
        if data.get("unsupported"):
            raise UnsupportedSystem(data["unsupported"], system)
        unknown = (UnknownPackages(data["unknown"], data.get("stoppedIn"), data.get("names"),
                                   declarable if data.get("declaredImage") is not None else "")
                   if data["unknown"] else None)
        if data.get("problems"):
            problems = [Problem(p["name"], p["kind"], p["detail"]) for p in data["problems"]]
            raise UnavailablePackages(self._explained(problems, source, system), unknown)
        if unknown:
            raise unknown
        return Resolved(data["packages"], data["derivations"], data.get("declaredImage"), data.get("mainProgram"))

    def declared_images(self, source: SourceArgs, system: str) -> object:
        """The set's declared images as raw data of its code ({"images": ...} or {"error": ...}),
        for nixery/declared.py to check: one evaluation of nixery-images.nix, under the same
        confinement and bounds as an image's."""
        raw = self._evaluate(["nix-instantiate", "--eval", "--strict", "--json", "-A", "declared",
                              *self._helper_args([], [], source, system)],
                             f"listing the declared images of {source.description}", source)
        return json.loads(raw)

    def attribute_names(self, source: SourceArgs, system: Optional[str],
                        sets: Sequence[str] = ("",)) -> dict[str, list[str]]:
        """The attribute names of the package set's `sets` (dotted paths; "" is the top level), from
        one evaluation within the evaluation bounds: the package search, and the start-up check
        that the set evaluates at all (Nix's error, a syntax error say, raises NixError)."""
        raw = self._evaluate(["nix-instantiate", "--eval", "--strict", "--json", "-A", "attributes",
                              *self._helper_args([], [], source, system),
                              "--argstr", "namesOf", json.dumps(list(sets))],
                             f"listing the packages of {source.description}", source)
        return {path: [str(name) for name in names] for path, names in json.loads(raw).items()}

    def _explained(self, problems: Sequence[Problem], source: SourceArgs, system: str) -> list[Problem]:
        """Names that throw get the set's own message: `explain` evaluates each without catching
        it (an error cannot be caught with its message in the Nix language)."""
        explained = []
        for i, problem in enumerate(problems):
            if problem.kind in ("throws", "fails") and i < EXPLAINED_MAX:
                try:
                    self._evaluate(["nix-instantiate", "--eval", "--strict", "--json", "-A", "explain",
                                    *self._helper_args([problem.name], [], source, system)],
                                   f"explaining {problem.name}", source)
                except NixError as e:
                    told = in_the_set(e.log, self._helper_args([problem.name], [], source, system))
                    message = first_error_line(told).removeprefix("error:").strip()
                    if problem.kind == "throws" and message:
                        problem = Problem(problem.name, "removed", message)
                    elif message:
                        problem = Problem(problem.name, "fails", message)
            explained.append(problem)
        return explained

    @contextlib.contextmanager
    def gc_roots(self) -> Iterator[Path]:
        """A directory whose links keep a build's outputs alive until the image is written."""
        root = self.gcroot_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        root.mkdir(parents=True)
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def add_roots(self, link: Path, paths: Sequence[str]) -> None:
        """Roots `paths` (valid already) with indirect roots at `link`, `link`-2, ... (nix-store's naming)."""
        self._run(["nix-store", "--add-root", str(link), "--realise", *paths], "rooting an image")

    def store_size(self) -> int:
        """The sum of the NAR sizes of every path in the store."""
        raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info", "--all", "--json"],
                        "measuring the store")
        data = json.loads(raw)
        entries = data.values() if isinstance(data, dict) else data
        return sum(int(info["narSize"]) for info in entries if info)

    def collect_garbage(self, max_freed: int) -> None:
        """Deletes paths no root holds (the image roots, the builds running, the system's own) until
        `max_freed` bytes are freed or none is left; Nix bounds its own run."""
        self._run(["nix-store", "--gc", "--max-freed", str(max_freed)], "collecting the store's garbage",
                  timeout=None)

    def closure(self, outputs: Sequence[str], store: Optional[str] = None) -> dict[str, StorePath]:
        """The runtime closure of `outputs`, from the local store or from `store` (a binary cache URL)."""
        raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                         *(["--store", store] if store else []), "--json", "--recursive", *outputs],
                        "querying the closure", cache_credentials=store is not None)
        return parse_path_info(raw)

    def build(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
              system: str, roots: Path, resolved: Resolved) -> Closure:
        """Builds what `resolve` found (GC roots in `roots`) and returns the runtime closure.

        Resolving is the caller's separate step so that evaluation and building are timed apart;
        building realises the derivations the resolve instantiated, so nothing is evaluated twice."""
        substitute = binary_cache.substituter_options(self.cache) if self.cache else []
        try:
            self.realise(sorted(set(resolved.derivations.values())), roots=roots, options=substitute)
        except DerivationFailed as e:
            raise as_seen_by(e, resolved) from None
        outputs = {n: resolved[n] for n in list(names) + list(optional) if n in resolved}
        paths = sorted(set(outputs.values()))
        closure = Closure(packages=outputs, paths=self.closure(paths))
        self._share(paths)
        return closure

    def _share(self, outputs: Sequence[str]) -> None:
        """Copies a build's closure to the shared binary cache; a failure costs other
        instances a rebuild, not this pull, so it is logged and the image is served."""
        if not (self.cache and self.cache.secret_key and outputs):
            return
        try:
            self._run(binary_cache.copy_command(self.cache, outputs), "copying to the binary cache",
                      cache_credentials=True)
        except NixError as e:
            log.warning("binary cache copy failed", extra={"reason": e.reason, "nix_log": e.log})


    def list_packages(self, source: SourceArgs, system: str,
                      attrs: Optional[Sequence[str]] = None) -> dict[str, tuple[str, str]]:
        """Attribute path -> (output path, "<drv>!<output>") for the set's derivations (`packages.nix`).

        Read-write mode writes the derivations to the store, so that they can be realised."""
        raw = self._evaluate(["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode",
                              *evaluation_options(source.kind, source.argument, self.allowed_uris), str(PACKAGES),
                              "--argstr", "srcType", source.kind, "--argstr", "srcArgs", source.argument,
                              "--argstr", "system", system,
                              "--argstr", "attrs", json.dumps(list(attrs) if attrs is not None else None)],
                             f"listing the packages of {source.description}", source)
        return {name: (entry["out"], entry["realise"]) for name, entry in json.loads(raw).items()}

    def realise(self, derivations: Sequence[str], roots: Optional[Path] = None, keep_going: bool = False,
                options: Sequence[str] = ()) -> None:
        """Builds "<drv>!<output>"s without evaluating anything again; GC roots in `roots` if given,
        Nix `options` (the shared binary cache's substituter) added to the command.

        The build timeout bounds each builder's run time and silence (Nix's own --timeout and
        --max-silent-time), not the command: downloading a large closure of substitutes takes
        as long as it takes (Nix's stalled-download-timeout stops a download that hangs)."""
        bounds = ["--timeout", str(self.timeout), "--max-silent-time", str(self.timeout)]
        flags = (bounds + [*BUILD_OPTIONS, *options] + (["--keep-going"] if keep_going else [])
                 + (["--add-root", str(roots / "out")] if roots else []))
        for i in range(0, len(derivations), ARGV_CHUNK):
            self._run(["nix-store", "--realise", *flags, *derivations[i:i + ARGV_CHUNK]], "building", timeout=None)

    def requisites(self, derivations: Sequence[str]) -> set[str]:
        """Every derivation that building `derivations` needs (their closure's .drv files, from the local store)."""
        found: set[str] = set()
        for i in range(0, len(derivations), ARGV_CHUNK):
            raw = self._run(["nix-store", "--query", "--requisites", *derivations[i:i + ARGV_CHUNK]],
                            "listing the derivations of a build")
            found.update(path for path in raw.split() if path.endswith(".drv"))
        return found

    def invalid(self, paths: Sequence[str], store: Optional[str] = None) -> set[str]:
        """Which of `paths` are not in the local store, or in `store` if given."""
        found: set[str] = set()
        for i in range(0, len(paths), ARGV_CHUNK):
            raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                             *(["--store", store] if store else []), "--json", *paths[i:i + ARGV_CHUNK]],
                            "checking store paths", cache_credentials=store is not None)
            data = json.loads(raw)
            entries = data.items() if isinstance(data, dict) else ((e["path"], e) for e in data)
            found.update(path for path, info in entries if info is None or info.get("valid") is False)
        return found


def _derivation_verdict(stderr: str) -> Optional[tuple[type[DerivationFailed], str, str]]:
    """Nix's own line saying that a builder failed or timed out (its kind, the line, the .drv), if
    any. The last such line: a builder's output is printed before Nix's verdict on it and may
    imitate one, naming another derivation (which would then be remembered as failed for every
    image that needs it: nixery/failures.py)."""
    text = _ANSI.sub("", stderr)
    found = [(match.start(), kind, match) for kind, pattern in ((BuildFailed, _BUILDER_FAILED),
                                                                (BuildTimedOut, _BUILDER_TIMED_OUT))
             for match in pattern.finditer(text)]
    if not found:
        return None
    _, kind, match = max(found, key=lambda entry: entry[0])
    return kind, match.group(0).strip()[:500], match.group(1)


def as_seen_by(error: DerivationFailed, resolved: Resolved) -> DerivationFailed:
    """`error` as the image of `resolved` sees it: naming its requested package whose build
    failed or timed out, or saying that a dependency's did (Nix's own line follows, with the
    derivation's path)."""
    nix_line = error.line.removeprefix("error:").strip()
    names = sorted(name for name, drv in resolved.derivations.items() if drv.split("!")[0] == error.derivation)
    what = names[0] if names else "a dependency"
    if isinstance(error, BuildTimedOut):
        return BuildTimedOut(f"{what} did not finish building within this instance's build timeout (NIX_TIMEOUT): "
                             f"{nix_line}", error.log, error.derivation, error.line)
    return type(error)(f"{what} failed to build: {nix_line}", error.log, error.derivation, error.line)


def _last_error(log_text: str, or_all: bool = False) -> list[str]:
    """The lines from Nix's last `error:` line on; if there is none, none (`or_all`: every line)."""
    lines = [_ANSI.sub("", line) for line in log_text.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("error:")]
    return lines[starts[-1]:] if starts else lines if or_all else []


def final_error(log_text: str) -> str:
    """Nix's own last error (the last line that starts with `error:`, and what follows it), without
    what the set's code puts there: what it printed before (`trace:` lines can say anything), the
    code Nix quotes and the positions it names, and an `abort` message (which Nix introduces as
    the code's own), nor what it quotes. Where a fault of the machine shows."""
    lines = _last_error(log_text, or_all=True)
    tail = [line for line in lines if not _QUOTED_CODE.match(line) and not _POSITION.match(line)]
    text = "\n".join(tail)
    if "evaluation aborted with the following error message" in text:
        return ""
    # What Nix quotes is the code's too: names, paths and values ('...', "...", «...»). Identifiers
    # it prints unquoted have no spaces, so the patterns the machine's faults match are phrases.
    return _QUOTED.sub("", text)


def _tarball_missing(source: SourceArgs, log_text: str) -> bool:
    """Whether Nix's last error is that the package set's own tarball (a `tarball` source's URL)
    answered 404 or 410. Only the download of that URL counts: what the set's code fetches is not
    the revision."""
    if source.kind != "tarball":
        return False
    last = "\n".join(_last_error(log_text))
    return any(match.group(1) == source.argument for match in _MISSING_DOWNLOAD.finditer(last))


def _machine_fault(text: str) -> Optional[str]:
    """What the operator should do about a failure of Nix that is not the package set's code
    (a download, the daemon, the machine), or None when `text` (Nix's log) shows none of those."""
    for pattern, todo in _NOT_THE_CODE:
        if pattern.search(text):
            return todo
    return None


def advice(error: NixError) -> Optional[str]:
    """What the operator should do about `error`, for a failure that is theirs or transient (a
    5xx: the client is told nothing more than "500"); None for one that the same request meets
    again (a 4xx, whose reason the client is told)."""
    if isinstance(error, (DerivationFailed, EvaluationLimit, Forbidden)):
        return None
    if isinstance(error, EvaluationFailed):
        return None if error.pinned else ("the package set does not evaluate (Nix's message and position: "
                                          "nix_log): fix its code, or configure a source that evaluates; "
                                          "every pull fails until then")
    if error.timed_out:
        return "Nix did not answer within NIX_TIMEOUT: check this machine's load and the nix-daemon"
    return _machine_fault(f"{error.reason}\n{error.log}") or "Nix failed (nix_log says why): fix that, the next pull retries"


def _set_directories(args: Sequence[str]) -> list[str]:
    """The directories among a command's arguments (the package set's, as `--argstr srcArgs`)."""
    return [a.rstrip("/") + "/" for a in args if a.startswith("/") and Path(a).is_dir()]


def _server_directories(args: Sequence[str]) -> list[tuple[str, str]]:
    """(a directory of the server that evaluation reads, what a client is told instead), the
    longest first: the package set's (as given and with links resolved) and the helper's."""
    named = [(directory.rstrip("/"), ".") for directory in _set_directories(args)] + [(str(NIX_DIR), "<nixery>")]
    both = {form: name for directory, name in named for form in (directory, str(Path(directory).resolve()))}
    return sorted(both.items(), key=lambda entry: -len(entry[0]))


def in_the_set(text: str, args: Sequence[str]) -> str:
    """`text` with the package set's directory left out of the paths it names (a git checkout's is
    the server's own: `getting status of 'pkgs/nope.nix'`, not of '/var/lib/...'), the directory
    itself as `.`, and the helper's as `<nixery>`: a set's code can name both (`toString ./.`,
    `builtins.unsafeGetAttrPos` of the arguments the helper gives it) in a message a client reads."""
    for directory, name in _server_directories(args):
        text = re.sub(re.escape(directory) + r"(/|(?![\w.-]))",
                      lambda match: "" if match.group(1) and name == "." else name + match.group(1), text)
    return text


def code_position(log_text: str, args: Sequence[str]) -> str:
    """` (at default.nix:1:8)`: where Nix's log points in the package set's code, relative to the
    set (a path outside it, or none, gives nothing: the client is not told the server's paths)."""
    match = _POSITION.search(_ANSI.sub("", log_text))
    if not match:
        return ""
    path, line, column = match.groups()
    for directory in _set_directories(args):
        if path.startswith(directory):
            return f" (at {path[len(directory):]}:{line}:{column})"
    inside = _STORE_PREFIX.match(path)
    return f" (at {path[inside.end():]}:{line}:{column})" if inside else ""


def remote_builder_systems(builders: str) -> set[str]:
    """The systems of Nix's `builders` setting (machine specs separated by ";" or new lines, or
    "@file" naming a machines file): each spec's second field lists them, comma-separated."""
    specs: list[str] = []
    for part in re.split(r"[;\n]", builders):
        part = part.strip()
        if part.startswith("@"):
            try:
                specs += Path(part[1:]).read_text().splitlines()
            except OSError:
                continue
        elif part:
            specs.append(part)
    systems: set[str] = set()
    for spec in specs:
        fields = spec.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[1] != "-":
            systems.update(s for s in fields[1].split(",") if s)
    return systems


def drop_gc_roots(gcroot_dir: Path, pid: Optional[int] = None) -> None:
    """Stops the Nix processes of a worker that died mid-build (`pid`), or of every earlier
    run, and once they are gone removes their builds' roots (the image roots stay).

    A killed worker never reaches `gc_roots`' clean-up, and its roots would pin store paths
    for good; its `nix-store` would go on building and re-create them. The master calls this
    at start-up and when a worker exits."""
    stop_recorded(gcroot_dir, pid)
    for root in gcroot_dir.glob(f"{pid}-*" if pid else "[0-9]*-*"):
        shutil.rmtree(root, ignore_errors=True)


def parse_path_info(raw: str) -> dict[str, StorePath]:
    """Accepts Nix 2.8's list form and newer Nix's object form of `path-info --json`."""
    data = json.loads(raw)
    items = data.items() if isinstance(data, dict) else ((entry["path"], entry) for entry in data)
    paths: dict[str, StorePath] = {}
    for path, info in items:
        if info is None:
            raise NixError(f"{path} is not valid in the Nix store")
        paths[path] = StorePath(path=path, nar_size=int(info["narSize"]),
                                references=tuple(sorted(r for r in info.get("references", []) if r != path)))
    return paths
