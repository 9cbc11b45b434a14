"""Calls to Nix: resolve names with the helper, build them, read the closure.

User input reaches Nix only as `--argstr` values (lists as JSON), never as
Nix source. stdout and stderr are read together and the whole process group
is killed on timeout, so a chatty or stuck Nix cannot hang a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import uuid
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

from ..config import BinaryCacheConfig, redact_url
from ..layers import StorePath
from . import cache as binary_cache

log = logging.getLogger(__name__)

HELPER = Path(str(resources.files(__package__).joinpath("helper.nix")))
PACKAGES = Path(str(resources.files(__package__).joinpath("packages.nix")))
# Paths per command line when a list of store paths may be long (ARG_MAX is about 2 MB).
ARGV_CHUNK = 5000
KILL_GRACE_SECONDS = 10
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NixError(Exception):
    """Nix failed; `reason` is one line for the client, `log` the whole story for the server log."""

    def __init__(self, reason: str, log_text: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.log = log_text


class UnknownPackages(Exception):
    def __init__(self, names: Sequence[str]):
        super().__init__(", ".join(names))
        self.names = tuple(names)


class UnsupportedSystem(Exception):
    """The package set cannot build for the image's system (a plain set asked for arm64); the message says why."""

    def __init__(self, reason: str, system: str):
        super().__init__(reason)
        self.system = system


class Resolved(dict):
    """Name -> output path of every name that resolved, carrying what builds them:
    `derivations` maps each name to "<drv>!<output>", which `nix-store --realise`
    builds without evaluating the package set a second time."""

    def __init__(self, packages: Mapping[str, str], derivations: Mapping[str, str]):
        super().__init__(packages)
        self.derivations = dict(derivations)


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


class Nix:
    """Runs Nix for one service; `on_invoke` hears each command's name (the metrics count them)."""

    def __init__(self, timeout: int, gcroot_dir: Path, on_invoke: Optional[Callable[[str], None]] = None,
                 cache: Optional[BinaryCacheConfig] = None):
        self.timeout = timeout
        self.gcroot_dir = gcroot_dir
        self.on_invoke = on_invoke
        self.cache = cache

    def _run(self, args: Sequence[str], what: str, timeout: Optional[float] = -1) -> str:
        """Runs one Nix command; `timeout` seconds (default: the build timeout; None: no limit,
        for commands that Nix bounds itself) before its process group is stopped."""
        timeout = self.timeout if timeout == -1 else timeout
        if self.on_invoke:
            self.on_invoke(args[0])
        log.debug("running nix", extra={"argv": list(args)})
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise NixError(f"{args[0]} is not installed or not on PATH") from None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self._stop(proc)
            raise NixError(f"{what} timed out after {timeout}s",
                           redact_url(err.decode(errors="replace"))) from None
        # Nix quotes the URLs it fails to download, credentials and all.
        stderr = redact_url(err.decode(errors="replace"))
        if proc.returncode != 0:
            raise NixError(f"{what} failed: {first_error_line(stderr)}", stderr)
        return out.decode()

    def _helper_args(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
                     system: str) -> list[str]:
        return [str(HELPER),
                "--argstr", "packages", json.dumps(list(names)),
                "--argstr", "optional", json.dumps(list(optional)),
                "--argstr", "srcType", source.kind,
                "--argstr", "srcArgs", source.argument,
                "--argstr", "system", system]

    @staticmethod
    def _stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
        """SIGTERM first: Nix then stops its builders, which run in sessions of their own
        and would outlive a SIGKILL'd client. SIGKILL the group if it does not exit."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.communicate(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()

    def resolve(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
                system: str) -> Resolved:
        """Name -> output path for every name that resolved; raises UnknownPackages listing all others,
        UnsupportedSystem when the set cannot build for `system` at all.

        The image's one evaluation of the package set: read-write mode writes the derivations
        to the store, and `build` realises them."""
        raw = self._run(["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "-A", "resolve",
                         *self._helper_args(names, optional, source, system)],
                        f"evaluating {source.description}")
        data = json.loads(raw)
        if data.get("unsupported"):
            raise UnsupportedSystem(data["unsupported"], system)
        if data["unknown"]:
            raise UnknownPackages(data["unknown"])
        return Resolved(data["packages"], data["derivations"])

    @contextlib.contextmanager
    def gc_roots(self) -> Iterator[Path]:
        """A directory whose links keep a build's outputs alive until the image is written."""
        root = self.gcroot_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        root.mkdir(parents=True)
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def closure(self, outputs: Sequence[str], store: Optional[str] = None) -> dict[str, StorePath]:
        """The runtime closure of `outputs`, from the local store or from `store` (a binary cache URL)."""
        raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                         *(["--store", store] if store else []), "--json", "--recursive", *outputs],
                        "querying the closure")
        return parse_path_info(raw)

    def build(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
              system: str, roots: Path, resolved: Resolved) -> Closure:
        """Builds what `resolve` found (GC roots in `roots`) and returns the runtime closure.

        Resolving is the caller's separate step so that evaluation and building are timed apart;
        building realises the derivations the resolve instantiated, so nothing is evaluated twice."""
        substitute = binary_cache.substituter_options(self.cache) if self.cache else []
        self.realise(sorted(set(resolved.derivations.values())), roots=roots, options=substitute)
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
            self._run(binary_cache.copy_command(self.cache, outputs), "copying to the binary cache")
        except NixError as e:
            log.warning("binary cache copy failed", extra={"reason": e.reason, "nix_log": e.log})


    def list_packages(self, source: SourceArgs, system: str,
                      attrs: Optional[Sequence[str]] = None) -> dict[str, tuple[str, str]]:
        """Attribute path -> (output path, "<drv>!<output>") for the set's derivations (`packages.nix`).

        Read-write mode writes the derivations to the store, so that they can be realised."""
        raw = self._run(["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(PACKAGES),
                         "--argstr", "srcType", source.kind, "--argstr", "srcArgs", source.argument,
                         "--argstr", "system", system,
                         "--argstr", "attrs", json.dumps(list(attrs) if attrs is not None else None)],
                        f"listing the packages of {source.description}")
        return {name: (entry["out"], entry["realise"]) for name, entry in json.loads(raw).items()}

    def realise(self, derivations: Sequence[str], roots: Optional[Path] = None, keep_going: bool = False,
                options: Sequence[str] = ()) -> None:
        """Builds "<drv>!<output>"s without evaluating anything again; GC roots in `roots` if given,
        Nix `options` (the shared binary cache's substituter) added to the command.

        The build timeout bounds each builder's run time and silence (Nix's own --timeout and
        --max-silent-time), not the command: downloading a large closure of substitutes takes
        as long as it takes (Nix's stalled-download-timeout stops a download that hangs)."""
        bounds = ["--timeout", str(self.timeout), "--max-silent-time", str(self.timeout)]
        flags = (bounds + [*options] + (["--keep-going"] if keep_going else [])
                 + (["--add-root", str(roots / "out")] if roots else []))
        for i in range(0, len(derivations), ARGV_CHUNK):
            self._run(["nix-store", "--realise", *flags, *derivations[i:i + ARGV_CHUNK]], "building", timeout=None)

    def invalid(self, paths: Sequence[str], store: Optional[str] = None) -> set[str]:
        """Which of `paths` are not in the local store, or in `store` if given."""
        found: set[str] = set()
        for i in range(0, len(paths), ARGV_CHUNK):
            raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                             *(["--store", store] if store else []), "--json", *paths[i:i + ARGV_CHUNK]],
                            "checking store paths")
            data = json.loads(raw)
            entries = data.items() if isinstance(data, dict) else ((e["path"], e) for e in data)
            found.update(path for path, info in entries if info is None or info.get("valid") is False)
        return found


def drop_gc_roots(gcroot_dir: Path, pid: Optional[int] = None) -> None:
    """Removes the roots of a worker that died mid-build (`pid`), or of every earlier run.

    A killed worker never reaches `gc_roots`' clean-up, and its roots would pin
    store paths for good; the master calls this at start-up and when a worker exits."""
    for root in gcroot_dir.glob(f"{pid}-*" if pid else "*"):
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
