"""Every real client against one real server: Docker (a real dockerd), containerd (`ctr`), podman
and skopeo pull the same images and run them, and a failure that every retry meets reaches each
client with its reason (Docker, podman and skopeo print the message of a 4xx answer only).

One server and one package set for the module: a git repository (every image pinned to a commit)
whose `main` is the test set with every store path new (so that `slowbuild` really builds, past
the module's NIX_TIMEOUT), whose tag `unparsable` is a commit whose default.nix does not parse and
whose tag `missing-file` one that imports a file it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import requests

from containers import _unavailable as unavailable, ensure_containerd, ensure_dockerd, ensure_podman
from pkgset import make_package_set
from support import Server, errors_of, skopeo_pull
from tls_front import TlsFront

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
# Short enough that `slowbuild` (which sleeps for minutes) is stopped quickly, long enough that
# every other build of the set (busybox scripts) finishes on a loaded machine.
NIX_TIMEOUT = 6
# Over what `shell/hello` takes (busybox: 2 MiB), under what `big` does (four parts of 1 MiB).
MAX_IMAGE_SIZE = "3M"
# What the image runs: the README's `docker run HOST/shell/... bash -c ...`, with the set's bash.
SCRIPT = 'hello && echo "bash says $((6 * 7))"'
SCRIPT_OUTPUT = "Hello, world!\nbash says 42\n"
# podman in a container here: its default limits are more than the container may set.
PODMAN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
# Where Docker looks for the CA of a registry it reaches over TLS (one directory per host:port).
DOCKER_CERTS = Path("/etc/docker/certs.d")


def run(argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("clients")
    repo = make_package_set(root / "repo", salt=uuid.uuid4().hex[:12], slow_seconds=600)
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the test set")
    good = (repo / "default.nix").read_text()
    (repo / "default.nix").write_text("{ system ? builtins.currentSystem, ... }:\n{ this is not nix\n")
    git(repo, "commit", "-q", "-am", "a commit that does not parse")
    git(repo, "tag", "unparsable")
    (repo / "default.nix").write_text("import ./missing.nix\n")
    git(repo, "commit", "-q", "-am", "a commit that imports a file it lacks")
    git(repo, "tag", "missing-file")
    (repo / "default.nix").write_text(good)
    git(repo, "commit", "-q", "-am", "the test set again")
    workdir = root / "server"
    workdir.mkdir()
    started = Server(workdir, {"NIXERY_PKGS_REPO": str(repo), "NIX_TIMEOUT": str(NIX_TIMEOUT),
                               "NIXERY_MAX_IMAGE_SIZE": MAX_IMAGE_SIZE}).start()
    yield started
    started.stop()


def registry_manifest(server: Server, name: str) -> tuple[str, dict]:
    """The digest and body of `name`'s Docker manifest, asked as Docker asks."""
    response = requests.get(f"{server.url}/v2/{name}/manifests/latest", headers={"Accept": MANIFEST_V2}, timeout=120)
    assert response.status_code == 200, response.text
    return "sha256:" + hashlib.sha256(response.content).hexdigest(), response.json()


@pytest.fixture(scope="module")
def docker(server) -> Iterator[str]:
    """Docker, with what the module pulled removed at the end."""
    ensure_dockerd()
    yield "docker"
    listed = [image for image in run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split()
              if image.startswith(f"{server.host}/")]
    if listed:
        run(["docker", "rmi", "-f", *listed])


def test_docker_pulls_runs_and_describes_an_image(server, docker):
    reference = f"{server.host}/shell/hello"
    pulled = run([docker, "pull", reference])
    assert pulled.returncode == 0, pulled.stderr
    digest, manifest = registry_manifest(server, "shell/hello")
    assert f"Digest: {digest}" in pulled.stdout, "Docker pulled the manifest the registry serves"

    # The README's example: the `shell` meta-package gives bash, coreutils and the rest.
    ran = run([docker, "run", "--rm", reference, "bash", "-c", SCRIPT], timeout=120)
    assert (ran.returncode, ran.stdout) == (0, SCRIPT_OUTPUT), ran.stderr
    # The image's own command is bash: with no command it reads its script from stdin.
    piped = subprocess.run([docker, "run", "--rm", "-i", reference], input="hello\n", capture_output=True,
                           text=True, timeout=120)
    assert piped.stdout == "Hello, world!\n", piped.stderr

    [inspected] = json.loads(run([docker, "inspect", reference]).stdout)
    config = requests.get(f"{server.url}/v2/shell/hello/blobs/{manifest['config']['digest']}", timeout=30).json()
    assert inspected["Id"] == manifest["config"]["digest"]
    assert inspected["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    assert len(inspected["RootFS"]["Layers"]) == len(manifest["layers"])
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", config["architecture"])
    assert inspected["Config"]["Cmd"] == ["bash"]
    assert inspected["Config"]["Labels"]["dev.nixery.packages"] == "bashInteractive,coreutils,hello,moreutils,nano"
    assert f"{reference}@{digest}" in inspected["RepoDigests"]

    # One history entry a layer, newest first: each store path's layer names it, the root layer last built.
    history = run([docker, "history", "--no-trunc", "--format", "{{.CreatedBy}}", reference]).stdout.splitlines()
    assert history[0].startswith("nixery root layer: ")
    assert history[1:] == [entry["created_by"] for entry in reversed(config["history"][:-1])]
    assert any(line.endswith("-hello") and line.startswith("/nix/store/") for line in history[1:]), history


def test_every_client_prints_the_reason_of_a_failure_that_repeats(server, docker, tmp_path):
    """A build that fails, a build past NIX_TIMEOUT, a tag whose commit does not parse and a closure
    over the size limit: each a 4xx whose message Docker, podman and skopeo print (containerd 1.6
    prints the status only)."""
    cases = {
        "broken": (422, ["broken failed to build: builder for '/nix/store/", "-broken.drv' failed with exit code 3"]),
        "slowbuild": (422, ["slowbuild did not finish building within this instance's build timeout (NIX_TIMEOUT): "
                            "building of '/nix/store/", f"-slow-build.drv!out' from .drv file timed out after "
                            f"{NIX_TIMEOUT} seconds"]),
        "hello:unparsable": (422, ["failed: error: syntax error, unexpected ID", "(at default.nix:2:"]),
        # The path is the set's own, not the server's checkout of it.
        "hello:missing-file": (422, ["failed: error: getting status of 'missing.nix': No such file"]),
        "big": (403, ["the image's packages take ", f"more than this instance's limit of {MAX_IMAGE_SIZE} "
                      "(NIXERY_MAX_IMAGE_SIZE)"]),
    }
    for name, (status, parts) in cases.items():
        image, _, tag = name.partition(":")
        response = requests.get(f"{server.url}/v2/{image}/manifests/{tag or 'latest'}", timeout=120)
        assert response.status_code == status, response.text
        [error] = errors_of(response)
        assert all(part in error["message"] for part in parts), (parts, error)
        assert str(server.workdir) not in error["message"], "no path of the server's own"

        pulled = run([docker, "pull", f"{server.host}/{name}"])
        assert pulled.returncode != 0 and f"{error['code'].lower()}: {error['message']}" in pulled.stderr, \
            pulled.stderr
        skopeo = skopeo_pull(server.host, image, tmp_path / f"oci-{image}", tag or "latest")
        assert skopeo.returncode != 0 and error["message"] in skopeo.stderr, skopeo.stderr

    # Where the build was stopped the server log says so, with Nix's whole log.
    failed = [e for e in server.log_entries() if e.get("message") == "nix failed" and e.get("image") == "slowbuild"]
    assert failed and "timed out" in failed[0]["nix_log"] and "action" not in failed[0], failed


def test_containerd_pulls_and_runs_an_image(server):
    ensure_containerd()
    reference = f"{server.host}/shell/hello:latest"
    pulled = run(["ctr", "images", "pull", "--plain-http", reference])
    try:
        assert pulled.returncode == 0, pulled.stderr
        digest, _ = registry_manifest(server, "shell/hello")
        listed = run(["ctr", "images", "ls", "--quiet"]).stdout.split()
        assert reference in listed
        described = run(["ctr", "images", "ls", f"name=={reference}"]).stdout
        assert digest in described, described
        ran = run(["ctr", "run", "--rm", reference, f"nixery-test-{uuid.uuid4().hex[:12]}", "bash", "-c", SCRIPT],
                  timeout=120)
        assert (ran.returncode, ran.stdout) == (0, SCRIPT_OUTPUT), ran.stderr
    finally:
        run(["ctr", "images", "rm", reference])
    # containerd 1.6 reads no error body: it shows the status, a 4xx for a failure that repeats.
    failed = run(["ctr", "images", "pull", "--plain-http", f"{server.host}/broken:latest"])
    assert failed.returncode != 0 and "422 Unprocessable Entity" in failed.stderr, failed.stderr


def test_podman_pulls_and_runs_an_image(server):
    ensure_podman()
    reference = f"{server.host}/shell/hello"
    try:
        pulled = run(["podman", "pull", "--tls-verify=false", reference])
        assert pulled.returncode == 0, pulled.stderr
        ran = run(["podman", "run", "--rm", *PODMAN_LIMITS, "--network", "none", reference, "bash", "-c", SCRIPT],
                  timeout=120)
        assert ran.stdout == SCRIPT_OUTPUT, ran.stderr
        digest, _ = registry_manifest(server, "shell/hello")
        assert run(["podman", "image", "inspect", "--format", "{{.Digest}}", reference]).stdout.strip() == digest
    finally:
        run(["podman", "rmi", "-f", reference])
    failed = run(["podman", "pull", "--tls-verify=false", f"{server.host}/broken"])
    assert failed.returncode != 0 and "broken failed to build: builder for '/nix/store/" in failed.stderr, failed.stderr


def outward_address() -> str:
    """This machine's address on its default route: Docker takes a registry on a loopback address
    for plain HTTP and checks no certificate there, so the TLS test must use another."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127.") or os.getuid() != 0:
        unavailable("the TLS test needs root and an address other than loopback (for Docker's certs.d)")
    return address


def test_every_client_pulls_over_tls_given_the_instance_ca(server, docker, tmp_path):
    """Behind a TLS proxy whose CA the clients are told of as docs/clients.md says: each pulls, and
    skopeo without the CA refuses the certificate (so TLS is what was checked)."""
    ensure_containerd()
    ensure_podman()
    front = TlsFront(outward_address(), server.port)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(front.ca_pem)
    docker_certs = DOCKER_CERTS / front.host
    reference = f"{front.host}/shell/hello"
    try:
        digest, _ = registry_manifest(server, "shell/hello")
        refused = run(["skopeo", "inspect", f"docker://{reference}"])
        assert refused.returncode != 0 and "certificate signed by unknown authority" in refused.stderr, refused.stderr
        skopeo_inspect = run(["skopeo", "inspect", "--cert-dir", str(certs), f"docker://{reference}"])
        assert skopeo_inspect.returncode == 0 and json.loads(skopeo_inspect.stdout)["Digest"] == digest, \
            skopeo_inspect.stderr
        podman = run(["podman", "pull", "--cert-dir", str(certs), reference])
        assert podman.returncode == 0, podman.stderr
        ctr = run(["ctr", "images", "pull", "--tlscacert", str(certs / "ca.crt"), f"{reference}:latest"])
        assert ctr.returncode == 0, ctr.stderr
        docker_certs.mkdir(parents=True)
        (docker_certs / "ca.crt").write_bytes(front.ca_pem)
        pulled = run([docker, "pull", reference])
        assert pulled.returncode == 0 and f"Digest: {digest}" in pulled.stdout, pulled.stderr
        ran = run([docker, "run", "--rm", reference, "bash", "-c", SCRIPT], timeout=120)
        assert ran.stdout == SCRIPT_OUTPUT, ran.stderr
    finally:
        front.close()
        shutil.rmtree(docker_certs, ignore_errors=True)
        run([docker, "rmi", "-f", reference])
        run(["podman", "rmi", "-f", reference])
        run(["ctr", "images", "rm", f"{reference}:latest"])
