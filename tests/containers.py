"""Stock Debian machines for the tests, as Docker containers built here from Debian's archive.

Nothing can be pulled from a public image registry on the machines that run the suite, so the
images are made with `mmdebstrap --variant=minbase SUITE` (Debian's smallest installable system)
and `docker import`. A stock image holds what `minbase` gives plus `git` (and the
`ca-certificates` package, with this machine's own CA certificates copied in, or nothing inside
reaches the package index). Each image is tagged by a hash of its recipe, so it is built once
(about 20 s) and reused by every later run; a file lock makes two pytest workers that ask at once
build it once.

    ensure_dockerd()                   # or the test is skipped (failed in CI), with the reason
    image = stock_image("trixie")
    with Container.start(image, publish=(8080,), options=pip_cache()) as box:
        box.copy_checkout("/src")      # the work tree, uncommitted changes included
        box.exec("scripts/install-deps", workdir="/src", env=BUILD_USERS_ENV)
        host_port = box.port(8080)     # published on 127.0.0.1
        serve_and_pull_hello(box, "NIXERY_PKGS_PATH=... scripts/serve", 8080, tmp_path)
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import pytest

from support import chroot_run, pull_and_unpack

ROOT = Path(__file__).resolve().parent.parent
CA_DIR = Path("/usr/local/share/ca-certificates")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nixery-tests"
IMAGE_NAME = "nixery-test-debian"
DAEMON_START_TIMEOUT = 60
# How long a client may wait for its daemon's answer.
ANSWER_TIMEOUT = 10
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
BUILD_TIMEOUT = 600
# What `--variant=minbase` leaves out that a test machine needs: git (to have a clone) and the CA
# bundle (to reach the package index). Nothing else: the scripts must install the rest.
STOCK_PACKAGES = ("git", "ca-certificates")
# For the first `scripts/install-deps` in a container (it runs scripts/setup-nix): build users with
# uids of their own. The containers share this machine's kernel, and Nix kills every process of a
# build user's uid before building as it: this machine's Nix, which sees the containers' processes,
# would otherwise kill their builds (as "signal 9") whenever it builds as nixbld1 too.
BUILD_USERS_ENV = {"NIX_BUILD_GROUP_ID": "40000", "NIX_FIRST_BUILD_UID": "40001"}
# systemd as PID 1 in a container without --privileged (which this machine refuses).
SYSTEMD_OPTIONS = ("--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
                   "--security-opt", "apparmor=unconfined", "-e", "container=docker",
                   "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw")


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive lock across processes (pytest workers, concurrent runs) on CACHE_DIR/name."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _answers(command: Sequence[str]) -> bool:
    """Whether `command` (a client asking its daemon) succeeds within ANSWER_TIMEOUT. A daemon that
    holds its socket but is not serving yet (or never will) keeps the client waiting: a no."""
    try:
        return subprocess.run(list(command), capture_output=True, timeout=ANSWER_TIMEOUT).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _unavailable(reason: str) -> None:
    """Skips the calling test where containers cannot run, except in CI (`CI` set), whose
    machine `scripts/install-deps --test` equips: there a missing engine is a failure, so that a
    green run never hides the stock-system tests."""
    if os.environ.get("CI"):
        pytest.fail(f"CI cannot run the container tests: {reason}")
    pytest.skip(reason)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ensure_daemon(command: Sequence[str], client: Sequence[str], package: str) -> None:
    """`client` succeeds when this returns: the daemon is started as `command` (as root, left running
    for later tests and runs) if it does not answer; otherwise the calling test is skipped (failed
    in CI) with the reason and the end of the daemon's log."""
    daemon = command[0]
    if shutil.which(client[0]) is None or shutil.which(daemon) is None:
        _unavailable(f"{package} is not installed (scripts/install-deps --test installs it)")
    log_path = CACHE_DIR / f"{daemon}.log"
    with file_lock(f"{daemon}.lock"):
        if _answers(client):
            return
        if os.getuid() != 0:
            _unavailable(f"{daemon} is not running and only root can start it")
        with open(log_path, "ab") as log:
            subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if _answers(client):
                return
            time.sleep(0.5)
    _unavailable(f"{daemon} did not answer within {DAEMON_START_TIMEOUT}s; the end of {log_path}:\n"
                 + _log_tail(log_path))


def ensure_containerd() -> None:
    """containerd answers `ctr` on its default socket when this returns, as for ensure_dockerd."""
    _ensure_daemon(["containerd"], ["ctr", "version"], "containerd")


def ensure_dockerd() -> None:
    """Docker answers when this returns; otherwise the calling test is skipped (failed in CI)
    with the reason. CI starts from a machine where docker.io is installed but nothing runs.

    Debian's dockerd runs on the system containerd, as its service unit does: a dockerd that finds
    containerd's socket left behind by a containerd that was killed (as every process of a session
    is before CI) waits for it forever, and so does every `docker` command."""
    if shutil.which("docker") and _answers(["docker", "info"]):
        return  # whatever runs it (rootless, its own containerd)
    ensure_containerd()
    _ensure_daemon(["dockerd", f"--containerd={CONTAINERD_SOCKET}"], ["docker", "info"], "docker.io")


def ensure_podman() -> None:
    """podman (daemonless) is installed, or the calling test is skipped (failed in CI)."""
    if shutil.which("podman") is None:
        _unavailable("podman is not installed (scripts/install-deps --test installs it)")


def _ca_certificates() -> list[Path]:
    return sorted(CA_DIR.glob("*.crt")) if CA_DIR.is_dir() else []


def stock_image(suite: str, packages: Sequence[str] = ()) -> str:
    """The tag of a stock minbase `suite` image (bookworm, trixie, ...) with STOCK_PACKAGES and
    `packages` (none by default: a test that adds some says why), built on first use.

    The tag is a hash of everything that makes the image (suite, packages, the certificates),
    so a changed recipe gets a new image and an unchanged one is never rebuilt."""
    include = sorted({*STOCK_PACKAGES, *packages})
    certificates = _ca_certificates()
    recipe = hashlib.sha256(repr((suite, include)).encode())
    for cert in certificates:
        recipe.update(cert.name.encode() + b"\0" + cert.read_bytes())
    tag = f"{IMAGE_NAME}:{suite}-{recipe.hexdigest()[:16]}"
    ensure_dockerd()
    with file_lock(f"image-{suite}.lock"):
        if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
            return tag
        if shutil.which("mmdebstrap") is None:
            _unavailable("mmdebstrap is not installed (scripts/install-deps --test installs it)")
        with tempfile.TemporaryDirectory(prefix="stock-debian-") as tmp:
            tarball = Path(tmp) / f"{suite}.tar"
            hooks = [f'cp {shlex.quote(str(c))} "$1/usr/local/share/ca-certificates/"' for c in certificates]
            hooks.append('chroot "$1" update-ca-certificates >/dev/null')
            command = ["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(include)}",
                       *(f"--customize-hook={hook}" for hook in hooks), suite, str(tarball)]
            built = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if built.returncode != 0:
                raise RuntimeError(f"mmdebstrap {suite} failed:\n{built.stderr[-3000:]}")
            imported = subprocess.run(["docker", "import", str(tarball), tag], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT)
            if imported.returncode != 0:
                raise RuntimeError(f"docker import failed: {imported.stderr}")
    return tag


def pip_cache(home: str = "/root") -> tuple[str, ...]:
    """`docker run` options that mount a pip cache kept on this machine at `home`/.cache/pip, so
    that the wheels a container's pip downloads are downloaded once across runs."""
    cache = CACHE_DIR / "pip"
    cache.mkdir(parents=True, exist_ok=True)
    return ("-v", f"{cache}:{home}/.cache/pip")


def checkout_files(root: Path = ROOT) -> list[str]:
    """The work tree's files as git sees them: tracked (as they are now, uncommitted changes
    included) and untracked but not ignored; deleted ones left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    return sorted({name for name in listed if name and os.path.lexists(root / name)})


def checkout_tar(root: Path = ROOT) -> bytes:
    """A tar of checkout_files(), modes kept, owned by root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in checkout_files(root):
            info = tar.gettarinfo(str(root / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isfile():
                with open(root / name, "rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    return buffer.getvalue()


class Container:
    """A running container, removed on stop (or when its `with` block ends)."""

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def start(cls, image: str, publish: Sequence[int] = (), systemd: bool = False,
              options: Sequence[str] = ()) -> "Container":
        """Runs `image` detached: idle (`sleep infinity`) or with systemd as PID 1. Each port in
        `publish` is published on 127.0.0.1 at a free port (see port())."""
        name = f"nixery-test-{uuid.uuid4().hex[:12]}"
        ports = [arg for port in publish for arg in ("-p", f"127.0.0.1::{port}")]
        command = ["/lib/systemd/systemd"] if systemd else ["sleep", "infinity"]
        run = ["docker", "run", "-d", "--rm", "--name", name, "--hostname", "stock-debian", *ports,
               *(SYSTEMD_OPTIONS if systemd else ()), *options, image, *command]
        started = subprocess.run(run, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"docker run failed: {started.stderr}")
        return cls(name)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=120)

    def _exec_args(self, user: Optional[str], workdir: Optional[str], env: Mapping[str, str]) -> list[str]:
        args = ["docker", "exec", "-i"]
        if user:
            args += ["--user", user]
        if workdir:
            args += ["--workdir", workdir]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        return args + [self.name]

    def exec(self, script: str, user: Optional[str] = None, workdir: Optional[str] = None,
             env: Mapping[str, str] = {}, timeout: float = 600, check: bool = True,
             stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
        """Runs `script` with bash in the container; output captured as text (stderr in stdout).
        With `check`, a non-zero exit raises with the output."""
        done = subprocess.run([*self._exec_args(user, workdir, env), "bash", "-c", script],
                              input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        result = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"`{script}` exited with {result.returncode} in {self.name}:\n"
                                 f"{result.stdout[-6000:]}")
        return result

    def spawn(self, script: str, log: Path, user: Optional[str] = None, workdir: Optional[str] = None,
              env: Mapping[str, str] = {}) -> subprocess.Popen:
        """Starts `script` in the container in the background, its output going to `log` on this
        machine; it ends when the container stops."""
        with open(log, "wb") as out:
            return subprocess.Popen([*self._exec_args(user, workdir, env), "bash", "-c", script],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def copy_in(self, tar: bytes, dest: str) -> None:
        """Unpacks `tar` at `dest` (made if missing)."""
        self.exec(f"mkdir -p {shlex.quote(dest)}")
        subprocess.run(["docker", "cp", "-", f"{self.name}:{dest}"], input=tar, check=True,
                       capture_output=True, timeout=300)

    def copy_checkout(self, dest: str = "/src", root: Path = ROOT) -> None:
        """Copies this checkout's work tree (checkout_files) to `dest`, as a user's clone would have it."""
        self.copy_in(checkout_tar(root), dest)

    def port(self, container_port: int) -> int:
        """The port on 127.0.0.1 that `container_port` is published at."""
        out = subprocess.run(["docker", "port", self.name, f"{container_port}/tcp"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith("127.0.0.1:"):
                return int(line.rsplit(":", 1)[1])
        raise AssertionError(f"port {container_port} of {self.name} is not published on 127.0.0.1: {out!r}")


def wait_for_registry(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Waits until a registry answers `GET /v2/` on 127.0.0.1:`port`, and returns its address
    (host:port); fails with the log of `proc` (what started it) if that ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server's command exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer:
                if answer.status == 200:
                    return f"127.0.0.1:{port}"
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)
    raise AssertionError(f"no registry answered on port {port} within {timeout}s:\n{log.read_text()[-6000:]}")


def serve_and_pull_hello(box: Container, script: str, container_port: int, workdir: Path,
                         user: Optional[str] = None, cwd: str = "/src") -> Path:
    """Starts `script` (a serve command) in `box`, waits for the registry at the published
    `container_port`, then pulls `shell/hello` from this machine with skopeo, unpacks it with umoci
    and runs `hello` in a chroot. Returns the server's log (in `workdir`), which stays running."""
    log = workdir / "serve.log"
    serve = box.spawn(script, log, user=user, workdir=cwd)
    host = wait_for_registry(box.port(container_port), serve, log)
    (workdir / "pull").mkdir()
    rootfs = pull_and_unpack(host, "shell/hello", workdir / "pull")
    assert chroot_run(rootfs, "/bin/hello").strip() == "Hello, world!"
    return log
