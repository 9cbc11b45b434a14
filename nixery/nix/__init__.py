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

from ..config import redact_url
from ..layers import StorePath

log = logging.getLogger(__name__)

HELPER = Path(str(resources.files(__package__).joinpath("helper.nix")))
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

    def __init__(self, timeout: int, gcroot_dir: Path, on_invoke: Optional[Callable[[str], None]] = None):
        self.timeout = timeout
        self.gcroot_dir = gcroot_dir
        self.on_invoke = on_invoke

    def _run(self, args: Sequence[str], what: str) -> str:
        if self.on_invoke:
            self.on_invoke(args[0])
        log.debug("running nix", extra={"argv": list(args)})
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise NixError(f"{args[0]} is not installed or not on PATH") from None
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            out, err = self._stop(proc)
            raise NixError(f"{what} timed out after {self.timeout}s",
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
                system: str) -> dict[str, str]:
        """Name -> output path for every name that resolved; raises UnknownPackages listing all others."""
        raw = self._run(["nix-instantiate", "--eval", "--strict", "--json", "-A", "resolve",
                         *self._helper_args(names, optional, source, system)],
                        f"evaluating {source.description}")
        data = json.loads(raw)
        if data["unknown"]:
            raise UnknownPackages(data["unknown"])
        return data["packages"]

    @contextlib.contextmanager
    def gc_roots(self) -> Iterator[Path]:
        """A directory whose links keep a build's outputs alive until the image is written."""
        root = self.gcroot_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        root.mkdir(parents=True)
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def closure(self, outputs: Sequence[str]) -> dict[str, StorePath]:
        raw = self._run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                         "--json", "--recursive", *outputs], "querying the closure")
        return parse_path_info(raw)

    def build(self, names: Sequence[str], optional: Sequence[str], source: SourceArgs,
              system: str, roots: Path, resolved: Mapping[str, str]) -> Closure:
        """Builds what `resolve` found (GC roots in `roots`) and returns the runtime closure.

        Resolving is the caller's separate step so that evaluation and building are timed apart."""
        self._run(["nix-build", "--out-link", str(roots / "out"),
                   "-A", "contents", *self._helper_args(names, optional, source, system)],
                  "building")
        outputs = {n: resolved[n] for n in list(names) + list(optional) if n in resolved}
        return Closure(packages=outputs, paths=self.closure(sorted(set(outputs.values()))))


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
