"""What the tests share: real Nixery servers, real registry clients, and the stand-in builder of the fast tier.

Servers are started as a user would start them (`python -m nixery`, Gunicorn
and all) with the environment a test gives; images are pulled with skopeo,
unpacked with umoci and run in a chroot. The fast tier runs the same app in
process (`falcon.testing`) with `StandInBuilder` in place of Nix.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import requests

from nixery import archive, manifest
from nixery.builder import Result, in_media_type
from nixery.stats import BuildStats
from nixery.image import Image
from nixery.nix import BuildFailed, NixError, UnknownPackages
from nixery.storage import Backend, StorageError, blob_key

ROOT = Path(__file__).resolve().parent.parent
# No binary cache is reachable here: asking one costs seconds per Nix call. A download that
# fails (the tests' unreachable tarball URLs) fails at once instead of retrying with back-off.
NIX_ENV = {"NIX_CONFIG": "substituters =\nwarn-dirty = false\ndownload-attempts = 1"}


def _ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (and to bind(0))."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port free now and outside the kernel's ephemeral range: a port from bind(0) is released
    before the server under test binds it, and meanwhile any outgoing connection of this busy
    machine (a client, Docker, a parallel test) may be given it."""
    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randint(10000, 65000)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found outside the ephemeral range")


class Server:
    """A running `python -m nixery` with its own storage, state and log file."""

    def __init__(self, workdir: Path, env: dict[str, str], wrapper: tuple[str, ...] = ()):
        """`wrapper` is a command the server runs under (a private mount namespace, say), which
        must end by exec'ing the command it is given."""
        self.workdir = workdir
        self.wrapper = wrapper
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
        """Returns once every worker has made its app (and so handles SIGTERM: a worker
        still booting when the server is stopped misses the signal, and Gunicorn then
        waits its whole graceful timeout for it) and the registry answers."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "nixery"], env=self.env, cwd=self.workdir,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        workers = int(self.env["NIXERY_WORKERS"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nixery exited with {self.proc.returncode}:\n{self.log()}")
            ready = len({e.get("pid") for e in self.log_entries() if e.get("message") == "worker ready"})
            try:
                # 401: the instance asks for a login (NIXERY_AUTH), and is up.
                if ready >= workers and requests.get(self.url + "/v2/", timeout=1).status_code in (200, 401):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nixery did not start:\n{self.log()}")

    def terminate(self) -> None:
        """Asks the server to stop (SIGTERM to Gunicorn and its workers); `wait` for it after."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self) -> bool:
        """Waits for the server to exit; False if it ignored SIGTERM for 20 s and had to be killed."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return False
        return True

    def stop(self) -> None:
        self.terminate()
        self.wait()

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

    def builds(self) -> int:
        """The `nix-store --realise` calls that build (not those that root a stored image's packages)."""
        return len([line for line in self.calls.read_text().splitlines() if line.startswith("nix-store --realise ")])


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


def errors_of(response) -> list[dict]:
    """The registry error list of a response (requests' or falcon.testing's)."""
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json() if callable(response.json) else response.json
    return body["errors"]


class StandInBuilder:
    """The builder's interface without Nix, for the fast tier: every image is the same small
    image, really archived and stored (a config and one layer of a few hundred kB of
    incompressible bytes), so that blobs, ranges and digests are real.

    A few package names make it fail the way the real builder's steps do, with their own
    exception types, so the app's error handling is what answers: `nosuch*` packages are
    unknown (all of them named), `broken` fails to build, `nix-down` cannot run Nix,
    `storage-down` finds storage unreachable and `crash` raises something nobody foresaw."""

    def __init__(self, storage: Backend, workdir: Path):
        self.storage = storage
        tree = workdir / "stand-in-layer" / "bin"
        tree.mkdir(parents=True)
        (tree / "payload").write_bytes(random.Random(7).randbytes(300_000))
        with storage.upload() as upload:
            layer = archive.write_layer(upload.file, store_paths=[str(tree.parent)])
            upload.commit(blob_key(layer.digest), archive.LAYER_MEDIA_TYPE)
        config = manifest.image_config("amd64", [layer.diff_id], [f"PATH={manifest.DEFAULT_PATH}"])
        storage.write(blob_key(config.digest), config.data, config.media_type)
        self.layer = manifest.Descriptor(archive.LAYER_MEDIA_TYPE, layer.digest, layer.size)
        self.config = config.descriptor()
        self.document = manifest.image_manifest(self.config, [self.layer])
        storage.write(blob_key(self.document.digest), self.document.data, self.document.media_type)
        self.requests: list[Image] = []

    def manifest(self, image: Image, media_type: str = manifest.MANIFEST_MEDIA_TYPE,
                 *, may_build: bool = True, client: str = "",
                 parking: object = None, index_only: bool = False) -> Result:
        self.requests.append(image)
        unknown = [name for name in image.packages if name.startswith("nosuch")]
        if unknown:
            raise UnknownPackages(unknown)
        if "broken" in image.packages:
            raise BuildFailed("broken failed to build: builder for broken failed with exit code 1", "the whole log",
                              "/nix/store/broken.drv")
        if "nix-down" in image.packages:
            raise NixError("nix-store is not installed or not on PATH")
        if "storage-down" in image.packages:
            raise StorageError("GCS bucket test: stat failed: cannot connect to Google Cloud Storage")
        if "crash" in image.packages:
            raise KeyError("stand-in crash")
        stats = BuildStats(image=image.name, tag=image.tag, layers=1, layers_reused=1,
                           bytes_reused=self.layer.size)
        return Result(in_media_type(self.storage, self.document, media_type), stats)


def setup_py_arguments() -> dict:
    """The keyword arguments of setup() in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords
                    if isinstance(k.value, (ast.Constant, ast.List, ast.Dict, ast.Tuple))}
    raise AssertionError("setup.py calls no setup()")


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def nixpkgs_lib() -> Optional[Path]:
    """nixpkgs' lib directory: NIXPKGS_LIB (the lib directory or a nixpkgs checkout), else ../shared."""
    given = os.environ.get("NIXPKGS_LIB")
    for candidate in ([Path(given)] if given else [ROOT.parent / "shared" / "nixpkgs-lib"]):
        for directory in (candidate, candidate / "lib"):
            if (directory / "default.nix").is_file() and (directory / "modules.nix").is_file():
                return directory
    return None
