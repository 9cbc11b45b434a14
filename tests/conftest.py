"""Shared test fixtures: generated package sets, real Nixery servers, real registry clients.

Servers are started as a user would start them (`python -m nixery`, Gunicorn
and all) with the environment a test gives; images are pulled with skopeo,
unpacked with umoci and run in a chroot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from pkgset import make_package_set  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# No binary cache is reachable here: asking one costs seconds per Nix call.
NIX_ENV = {"NIX_CONFIG": "substituters =\nwarn-dirty = false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `python -m nixery` with its own storage, state and log file."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"server-{self.port}.log"
        self.env = {**os.environ, **NIX_ENV, "PORT": str(self.port), "NIXERY_LISTEN_ADDRESS": "127.0.0.1",
                    "STORAGE_PATH": str(workdir / "storage"), "NIXERY_STATE_DIR": str(workdir / "state"),
                    "NIXERY_WORKERS": "2", "PYTHONPATH": str(ROOT), **env}
        for key in ("NIXERY_CHANNEL", "NIXERY_PKGS_REPO", "NIXERY_PKGS_PATH", "BUCKET", "GCS_BUCKET"):
            if key not in env:
                self.env.pop(key, None)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "Server":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nixery"], env=self.env, cwd=self.workdir,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nixery exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # 401: the instance asks for a login (NIXERY_AUTH), and is up.
                if requests.get(self.url + "/v2/", timeout=1).status_code in (200, 401):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nixery did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict]:
        entries = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    pass
        return entries


@pytest.fixture(scope="session")
def pkgset(tmp_path_factory) -> Path:
    """The shared test package set (store paths are reused across tests and runs)."""
    return make_package_set(tmp_path_factory.mktemp("pkgset"))


@pytest.fixture
def fresh_pkgset(tmp_path) -> Path:
    """A package set whose every store path is new, for tests that need a real first build."""
    return make_package_set(tmp_path / "fresh-pkgset", salt=uuid.uuid4().hex[:12])


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Factory: start_server(env={...}, workdir=None) -> a running Server; all are stopped after the test."""
    servers: list[Server] = []

    def start(env: dict[str, str], workdir: Optional[Path] = None) -> Server:
        directory = workdir or tmp_path / f"nixery-{len(servers)}"
        directory.mkdir(parents=True, exist_ok=True)
        server = Server(directory, env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def nix_counter(tmp_path) -> Iterator["NixCounter"]:
    yield NixCounter(tmp_path / "nix-counter")


class NixCounter:
    """A PATH prefix whose nix, nix-build, nix-instantiate and nix-store log each call, then run the real one."""

    def __init__(self, directory: Path):
        self.bin = directory / "bin"
        self.bin.mkdir(parents=True)
        self.calls = directory / "calls"
        self.calls.touch()
        for tool in ("nix", "nix-build", "nix-instantiate", "nix-store"):
            real = shutil.which(tool)
            assert real, f"{tool} is not installed"
            script = self.bin / tool
            script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{self.calls}"\nexec "{real}" "$@"\n')
            script.chmod(0o755)

    def path(self) -> str:
        return f"{self.bin}:{os.environ['PATH']}"

    def reset(self) -> None:
        """Forget the calls so far (a server's start-up check builds a trivial derivation)."""
        self.calls.write_text("")

    def count(self, tool: Optional[str] = None) -> int:
        lines = self.calls.read_text().splitlines()
        return len([line for line in lines if tool is None or line.split(" ", 1)[0] == tool])


def skopeo_pull(host: str, name: str, dest: Path, tag: str = "latest",
                creds: Optional[str] = None) -> subprocess.CompletedProcess:
    """`skopeo copy` into an OCI layout at dest (tag `tag`), logging in with `user:password` when
    given; returns the finished process."""
    login = ["--src-creds", creds] if creds else []
    return subprocess.run(["skopeo", "copy", "--src-tls-verify=false", *login, f"docker://{host}/{name}:{tag}",
                           f"oci:{dest}:{tag}"], capture_output=True, text=True, timeout=300)


def pull_and_unpack(host: str, name: str, workdir: Path, tag: str = "latest", creds: Optional[str] = None) -> Path:
    """Pulls with skopeo and unpacks with umoci; returns the rootfs."""
    oci = workdir / "oci"
    result = skopeo_pull(host, name, oci, tag, creds)
    assert result.returncode == 0, result.stderr
    bundle = workdir / "bundle"
    unpack = subprocess.run(["umoci", "unpack", "--image", f"{oci}:{tag}", str(bundle)],
                            capture_output=True, text=True, timeout=300)
    assert unpack.returncode == 0, unpack.stderr
    return bundle / "rootfs"


def chroot_run(rootfs: Path, *argv: str) -> str:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    result = subprocess.run([chroot, str(rootfs), *argv], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/bin:/usr/bin"})
    assert result.returncode == 0, f"{argv} failed: {result.stderr}"
    return result.stdout


def oci_manifest(oci: Path, tag: str = "latest") -> dict:
    index = json.loads((oci / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"]
                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    return json.loads((oci / "blobs" / "sha256" / digest.split(":")[1]).read_text())
