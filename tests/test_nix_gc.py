"""The Nix store's collection keeps what storage still serves: a server on a Nix store of its
own (a private /nix in a mount namespace, so that collecting it frees nobody else's paths)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from load_support import git_source
from pkgset import make_package_set
from support import Server

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def private_store(nix: Path) -> tuple[str, ...]:
    """A command prefix that runs what follows with `nix` mounted at /nix (its own store).

    Its builds run without build users: those are the machine's uids, shared with the real store,
    and Nix kills every process of a build user before it builds as that user, so this store and
    the real one (another test's build at the same moment) would kill each other's builders."""
    return (shutil.which("unshare"), "--mount", "--propagation", "private", shutil.which("bash"), "-c",
            f"mkdir -p {nix}/store {nix}/var/nix && chown root:nixbld {nix}/store && chmod 1775 {nix}/store "
            f"&& mount --bind {nix} /nix && NIX_CONFIG=\"$NIX_CONFIG\nbuild-users-group =\" exec \"$@\"",
            "private-store")


def outputs(nix: Path, name: str) -> list[Path]:
    """The valid-looking output paths of package `name` (`<hash>-<name>`, no .drv) in that store."""
    return [p for p in (nix / "store").glob(f"*-{name}") if p.is_dir()]


def counted(server: Server, name: str = "nixery_nix_invocations_total") -> float:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name)


def pull(server: Server, name: str) -> requests.Response:
    """The manifest of `name` and every blob it names, each checked against its digest."""
    manifest = requests.get(f"{server.url}/v2/{name}/manifests/latest", headers={"Accept": MANIFEST_V2}, timeout=120)
    assert manifest.status_code == 200, manifest.text
    for blob in [manifest.json()["config"], *manifest.json()["layers"]]:
        data = requests.get(f"{server.url}/v2/{name}/blobs/{blob['digest']}", timeout=60).content
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob["digest"]
    return manifest


def wait_for_log(server: Server, message: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in server.log_entries() if e.get("message") == message]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no {message!r} in the log:\n{server.log()}")


def hello_and_nano(tmp_path: Path) -> tuple[Path, tuple[str, ...], dict[str, str], Path, requests.Response,
                                            requests.Response]:
    """A server on a store of its own (the store, its wrapper, the server's environment and
    folder) that pulled "hello" and "nano" (their manifests) and stopped."""
    nix = tmp_path / "nix"
    wrapper = private_store(nix)
    packages = make_package_set(tmp_path / "set", salt=uuid.uuid4().hex[:12])
    env = {"NIXERY_PKGS_REPO": git_source(packages, tmp_path / "repo.git"), "NIXERY_WORKERS": "1"}
    workdir = tmp_path / "server"
    workdir.mkdir()
    first = Server(workdir, env, wrapper).start()
    try:
        hello, nano = pull(first, "hello"), pull(first, "nano")
    finally:
        first.stop()
    assert outputs(nix, "hello") and outputs(nix, "nano")
    return nix, wrapper, env, workdir, hello, nano


def check_hello_kept_and_nano_freed(server: Server, nix: Path, wrapper: tuple[str, ...]) -> None:
    """Once the store was collected: the stored image's ("hello") paths are there, anyone's
    nix-collect-garbage keeps them and it is served without Nix; the removed one's ("nano") are
    freed and it is built again."""
    assert outputs(nix, "hello"), "the stored image's packages are kept"
    assert not outputs(nix, "nano"), "the collected image's packages are freed"
    subprocess.run([*wrapper, "nix-collect-garbage"], check=True, capture_output=True, timeout=120)
    assert outputs(nix, "hello")
    before = counted(server)
    pull(server, "hello")
    assert counted(server) == before, "a stored image is served without Nix"
    pull(server, "nano")
    assert counted(server) > before and outputs(nix, "nano"), "a collected image is built again"


def test_an_image_the_storage_collector_removes_is_freed_from_the_store(tmp_path):
    """The whole way: an image left unpulled past NIXERY_STORAGE_MAX_AGE is removed by the server's
    storage collection, which drops its root and (past NIXERY_NIX_STORE_LIMIT) collects the store
    at once, with no build to start it; a kept image's paths stay and it is served without Nix."""
    nix, wrapper, env, workdir, kept, _ = hello_and_nano(tmp_path)
    # Two days pass with only "hello" pulled.
    storage = workdir / "storage"
    old = time.time() - 2 * 86400
    for path in storage.rglob("*"):
        if path.is_file() and path.name != "gc.lease":
            os.utime(path, (old, old))
    os.utime(storage / "layers" / ("sha256:" + hashlib.sha256(kept.content).hexdigest()))

    second = Server(workdir, {**env, "NIXERY_STORAGE_MAX_AGE": "1d", "NIXERY_GC_INTERVAL": "2",
                              "NIXERY_NIX_STORE_LIMIT": "1"}, wrapper).start()
    try:
        collected = wait_for_log(second, "storage collected")
        assert (collected["removed_images"], collected["kept_images"]) == (1, 1), collected
        wait_for_log(second, "nix store collected")
        assert counted(second, "nixery_builds_total") == 0, "no build started the store's collection"
        check_hello_kept_and_nano_freed(second, nix, wrapper)
    finally:
        second.stop()


def test_collecting_the_store_keeps_stored_images_and_frees_collected_ones(tmp_path):
    nix, wrapper, env, workdir, _, collected = hello_and_nano(tmp_path)
    # "nano" leaves storage, as a storage collection removes an image: its manifest (the cached
    # one and the blob) goes.
    storage = workdir / "storage"
    digest = "sha256:" + hashlib.sha256(collected.content).hexdigest()
    for record in (storage / "manifests").iterdir():
        if record.suffix != ".type" and record.read_bytes() == collected.content:
            record.unlink()
    (storage / "layers" / digest).unlink()

    # Past NIXERY_NIX_STORE_LIMIT, the build of another image starts Nixery's own collection.
    second = Server(workdir, {**env, "NIXERY_NIX_STORE_LIMIT": "1"}, wrapper).start()
    try:
        pull(second, "iana-etc")
        wait_for_log(second, "nix store collected")
        check_hello_kept_and_nano_freed(second, nix, wrapper)
        assert outputs(nix, "iana-etc")
    finally:
        second.stop()


def test_a_root_is_dropped_only_once_its_manifest_is_gone(tmp_path):
    """Stale roots are found by a listing (the collector's, or one of storage's own), and each is
    looked for once more before it goes: a manifest stored since the listing keeps its root."""
    from nixery.nix import Nix
    from nixery.nixstore import ImageRoots
    from nixery.storage import blob_key
    from nixery.storage.filesystem import FilesystemBackend

    storage = FilesystemBackend(tmp_path / "storage")
    roots = ImageRoots(Nix(60, tmp_path / "gcroots"), tmp_path / "locks")
    stored, since, gone = (b'{"schemaVersion": 2, "n": %d}' % n for n in range(3))
    digests = {data: "sha256:" + hashlib.sha256(data).hexdigest() for data in (stored, since, gone)}
    for data, digest in digests.items():
        (roots.directory / digest).mkdir(parents=True)
    storage.write(blob_key(digests[stored]), stored, "application/vnd.oci.image.manifest.v1+json")
    listed = {o.key for o in storage.objects()}
    storage.write(blob_key(digests[since]), since, "application/vnd.oci.image.manifest.v1+json")

    assert roots.prune(storage, listed) == [digests[gone]]
    assert sorted(p.name for p in roots.directory.iterdir()) == sorted([digests[stored], digests[since]])
    storage.root.joinpath(blob_key(digests[stored])).unlink()
    assert roots.prune(storage) == [digests[stored]], "storage's own listing"
