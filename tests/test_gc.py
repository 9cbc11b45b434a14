"""Storage with a budget: collections keep the most recently pulled images within NIXERY_STORAGE_LIMIT,
pulls of what was collected (or deleted by hand) heal, and collections run one at a time.

Every pull is skopeo's; every blob it got is hashed again here, and so is every blob left in storage.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from pkgset import including, make_package_set
from support import NIX_ENV, Server, oci_manifest, skopeo_pull
from test_gcs import Emulator, gcs_env

from nixery.config import GcsConfig
from nixery.storage.filesystem import FilesystemBackend
from nixery.storage.gcs import GcsBackend

IMAGES = 60
BLOB_KB = 200  # random bytes in each image's one package: its layer compresses to about as much
LIMIT = 1 << 20  # about four images


def _blob_set(directory: Path, base: Path, count: int = IMAGES) -> Path:
    """The test package set plus `count` packages `blob0`... of BLOB_KB random KiB each, sharing
    nothing: `count` cheap images of known size."""
    directory.mkdir(parents=True)
    (directory / "default.nix").write_text(f"""
args@{{ system ? builtins.currentSystem, ... }}:
let
  base = import {including(directory, base)} args;
  bbdir = builtins.path {{ path = ./base/busybox-static; name = "busybox-static"; }};
  blob = i: derivation {{
    name = "gc-blob-${{toString i}}";
    inherit system;
    salt = "{uuid.uuid4().hex[:12]}";
    builder = "${{bbdir}}/bin/busybox";
    args = [ "sh" "-e" "-c"
      "${{bbdir}}/bin/busybox mkdir -p $out && ${{bbdir}}/bin/busybox dd if=/dev/urandom of=$out/data bs=1024 count={BLOB_KB}" ];
  }};
in base // builtins.listToAttrs (builtins.genList (i: {{ name = "blob${{toString i}}"; value = blob i; }}) {count})
""")
    return directory


@pytest.fixture(scope="module")
def blob_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gc-set")
    return _blob_set(root / "set", make_package_set(root / "base"))


def stored_bytes(storage: Path) -> int:
    return sum(f.stat().st_size for sub in ("layers", "builds", "manifests") for f in (storage / sub).iterdir())


def metric(server: Server, name: str, labels: str = "") -> float:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for_collection(server: Server, after: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, "nixery_gc_last_run_timestamp_seconds") <= after:
        assert time.monotonic() < deadline, "no collection ran"
        time.sleep(0.2)


def check_pulled(oci: Path, tag: str = "latest") -> None:
    """Every blob skopeo wrote holds the bytes its digest names."""
    found = oci_manifest(oci, tag)
    for descriptor in [found["config"], *found["layers"]]:
        data = (oci / "blobs" / "sha256" / descriptor["digest"].split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        assert len(data) == descriptor["size"]


def check_storage(storage: Path) -> None:
    for blob in (storage / "layers").iterdir():
        if not blob.name.endswith(".type"):
            assert blob.name == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest(), blob


def test_sixty_images_stay_within_the_limit_and_all_pull_again(start_server, blob_set, tmp_path):
    server = start_server({"NIXERY_PKGS_PATH": str(blob_set), "NIXERY_STORAGE_LIMIT": str(LIMIT),
                           "NIXERY_GC_INTERVAL": "1", "NIXERY_GC_GRACE": "1"})
    storage = server.workdir / "storage"
    largest, removed = 0, 0
    for i in range(IMAGES):
        before = stored_bytes(storage)
        result = skopeo_pull(server.host, f"blob{i}", tmp_path / f"first-{i}")
        assert result.returncode == 0, result.stderr
        largest = max(largest, stored_bytes(storage) - before)
        wait_for_collection(server, time.time())
        assert stored_bytes(storage) <= LIMIT + largest, (i, stored_bytes(storage))
    removed = metric(server, "nixery_gc_removed_objects_total")
    assert removed > 0 and metric(server, "nixery_gc_removed_bytes_total") > (IMAGES - 10) * BLOB_KB * 1024
    assert metric(server, "nixery_storage_bytes") <= LIMIT + largest
    check_storage(storage)

    # Every image pulls again (those collected are built again), whole and correct.
    for i in range(IMAGES):
        result = skopeo_pull(server.host, f"blob{i}", tmp_path / f"again-{i}")
        assert result.returncode == 0, (i, result.stderr)
        check_pulled(tmp_path / f"again-{i}")
        assert oci_manifest(tmp_path / f"again-{i}") == oci_manifest(tmp_path / f"first-{i}")
    check_storage(storage)


def _pinned(pkgset: Path, directory: Path) -> dict[str, str]:
    """A channel of the package set at a commit: its manifests are stored and served from storage."""
    directory.mkdir()
    commit = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
    subprocess.run(["tar", "czf", str(directory / f"{commit}.tar.gz"), "-C", str(pkgset.parent), pkgset.name],
                   check=True)
    return {"NIXERY_CHANNEL": "nixos-unstable", "NIXERY_CHANNEL_URL_TEMPLATE": f"file://{directory}/{{rev}}.tar.gz",
            "NIXERY_CHANNEL_COMMITS": commit, "commit": commit}


def test_a_layer_deleted_by_hand_is_built_again(start_server, blob_set, tmp_path):
    pinned = _pinned(blob_set, tmp_path / "channel")
    commit = pinned.pop("commit")
    env = {**pinned, "NIXERY_WORKERS": "1"}
    first = start_server(env, workdir=tmp_path / "instance")
    storage = first.workdir / "storage"
    assert skopeo_pull(first.host, "blob1/hello", tmp_path / "first", tag=commit).returncode == 0
    layers = oci_manifest(tmp_path / "first", commit)["layers"]
    biggest = max(layers, key=lambda layer: layer["size"])["digest"]
    first.stop()

    # A manifest request finds the stored manifest's layer gone and builds the image again (a new
    # server: the first one's worker remembers having found the manifest's blobs, for 30 s).
    (storage / "layers" / biggest).unlink()
    server = start_server(env, workdir=tmp_path / "instance")
    result = skopeo_pull(server.host, "blob1/hello", tmp_path / "second", tag=commit)
    assert result.returncode == 0, result.stderr
    check_pulled(tmp_path / "second", commit)
    assert oci_manifest(tmp_path / "second", commit) == oci_manifest(tmp_path / "first", commit)
    assert metric(server, "nixery_heals_total", '{request="manifest"}') == 1
    check_storage(storage)

    # A blob request for a blob gone since its manifest was served builds the image again too.
    served = requests.get(f"{server.url}/v2/blob1/hello/manifests/{commit}", timeout=60)
    manifest = served.json()
    (storage / "layers" / biggest).unlink()
    response = requests.get(f"{server.url}/v2/blob1/hello/blobs/{biggest}", timeout=120)
    assert response.status_code == 200, response.text
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == biggest
    assert metric(server, "nixery_heals_total", '{request="blob"}') == 1
    assert [layer["digest"] for layer in manifest["layers"]] == [layer["digest"] for layer in layers]
    # A blob no image pulled here names is not built for.
    unknown = "sha256:" + "0" * 64
    assert requests.get(f"{server.url}/v2/blob1/hello/blobs/{unknown}", timeout=60).status_code == 404

    # A manifest asked for by digest after its image was removed whole is built again by its tag.
    digest = served.headers["Docker-Content-Digest"]
    for path in [*(storage / "manifests").iterdir(), storage / "layers" / digest]:
        path.unlink()
    again = requests.get(f"{server.url}/v2/blob1/hello/manifests/{digest}", timeout=120)
    assert again.status_code == 200 and again.content == served.content
    assert metric(server, "nixery_heals_total", '{request="manifest"}') == 2
    assert requests.get(f"{server.url}/v2/blob1/hello/manifests/{unknown}", timeout=60).status_code == 404

    # Made-up digests asked for under the name of a manifest that is gone: one look at the image (a
    # build that finds it stored, and every blob of it), not one per request.
    (storage / "layers" / digest).unlink()
    for i in range(5):
        made_up = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
        assert requests.get(f"{server.url}/v2/blob1/hello/blobs/{made_up}", timeout=60).status_code == 404
    looks = [e for e in server.log_entries() if e.get("message") == "blob gone: building its image again"]
    assert len(looks) <= 2, looks  # the healed layer's, and at most one for the five


def test_a_collection_during_fifty_pulls_loses_none(start_server, blob_set, tmp_path):
    """25 images built and stored, then left unpulled for an hour (their files' times set back); a
    server whose limit holds two of them collects every second while 50 clients pull all 25."""
    pinned = _pinned(blob_set, tmp_path / "channel")
    commit = pinned.pop("commit")
    env = {**pinned, "NIXERY_CLIENT_BUILDS": "256", "NIXERY_THREADS": "16"}
    names = [f"blob{20 + i % 25}/hello" for i in range(50)]

    def pull(server: Server, prefix: str, i: int, stagger: float):
        time.sleep(i * stagger)
        return skopeo_pull(server.host, names[i], tmp_path / f"{prefix}-{i}", commit)

    def pull_all(server: Server, prefix: str, stagger: float = 0.0) -> None:
        """50 pulls at once; with `stagger`, started that many seconds apart (so that collections
        find images not yet asked for, while others are being pulled)."""
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda i: pull(server, prefix, i, stagger), range(50)))
        assert [r.returncode for r in results] == [0] * 50, [r.stderr for r in results if r.returncode]
        for i in range(50):
            check_pulled(tmp_path / f"{prefix}-{i}", commit)

    workdir = tmp_path / "shared"
    builder = start_server(env, workdir=workdir)
    pull_all(builder, "built")
    builder.stop()
    storage = workdir / "storage"
    # Collecting every second: what was just built is within the grace period, and stays.
    server = start_server({**env, "NIXERY_STORAGE_LIMIT": str(LIMIT // 2), "NIXERY_GC_INTERVAL": "1",
                           "NIXERY_GC_GRACE": "30"}, workdir=workdir)
    hour_ago = time.time() - 3600
    for sub in ("layers", "builds", "manifests"):
        for path in (storage / sub).iterdir():
            os.utime(path, (hour_ago, hour_ago))
    started = time.time()
    pull_all(server, "pulled", stagger=0.1)
    ended = time.time()
    during = [e for e in server.log_entries() if e.get("message") == "storage collected"
              and started <= e["finished"] <= ended and e["removed_objects"]]
    assert during, "a collection removed images while the pulls ran"
    check_storage(storage)


def test_a_bucket_is_kept_within_its_limit_by_custom_times(start_server, blob_set, tmp_path):
    """The same policy on GCS: pulls set their manifests' custom time, collections remove the least
    recently pulled images from the bucket, and a removed image pulls again."""
    emulator = Emulator(tmp_path / "gcs", f"nixery-budget-{uuid.uuid4().hex[:8]}").start()
    try:
        server = start_server(gcs_env(emulator, NIXERY_PKGS_PATH=str(blob_set), NIXERY_STORAGE_LIMIT=str(LIMIT // 2),
                                      NIXERY_GC_INTERVAL="1", NIXERY_GC_GRACE="1"))

        def bucket_bytes() -> int:
            return sum(blob.size for name, blob in emulator.objects().items()
                       if name.startswith(("layers/", "builds/", "manifests/")))

        sizes = []
        for i in range(4):
            before = bucket_bytes()
            result = skopeo_pull(server.host, f"blob{50 + i}", tmp_path / f"pull-{i}")
            assert result.returncode == 0, result.stderr
            sizes.append(bucket_bytes() - before)
            wait_for_collection(server, time.time())
            objects = emulator.objects()
            assert bucket_bytes() <= LIMIT // 2 + max(sizes), (i, bucket_bytes())
        marked = [name for name, blob in objects.items() if blob.custom_time is not None]
        assert any(objects[name].content_type == "application/vnd.docker.distribution.manifest.v2+json"
                   for name in marked), "pulls mark their manifests (and builds the layers they reuse)"
        assert metric(server, "nixery_gc_removed_objects_total") > 0
        result = skopeo_pull(server.host, "blob50", tmp_path / "again")
        assert result.returncode == 0, result.stderr
        check_pulled(tmp_path / "again")
        assert oci_manifest(tmp_path / "again") == oci_manifest(tmp_path / "pull-0")
    finally:
        emulator.stop()


def _collections(*servers: Server) -> list[tuple[float, float, int]]:
    """(start, end, pid) of every collection the servers' workers logged."""
    return sorted((e["finished"] - e["duration"], e["finished"], e["pid"]) for server in servers
                  for e in server.log_entries() if e.get("message") == "storage collected")


def test_workers_and_instances_on_one_bucket_never_collect_at_once(start_server, tmp_path, monkeypatch):
    emulator = Emulator(tmp_path / "gcs", f"nixery-gc-{uuid.uuid4().hex[:8]}").start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        backend = GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 5))
        for i in range(300):  # images that stay (no budget): each collection lists them all
            config = f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}"
            backend.write(f"layers/{config}", str(i).encode(), "application/vnd.docker.container.image.v1+json")
            document = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "config": {"digest": config}, "layers": []}).encode()
            backend.write(f"layers/sha256:{hashlib.sha256(document).hexdigest()}", document,
                          "application/vnd.oci.image.manifest.v1+json")
        pkgset = make_package_set(tmp_path / "pkgset")
        env = gcs_env(emulator, NIXERY_PKGS_PATH=str(pkgset), NIXERY_GC_INTERVAL="1", NIXERY_WORKERS="2")
        servers = [start_server(env), start_server(env)]
        time.sleep(20)
        for server in servers:
            server.stop()
        collections = _collections(*servers)
        assert len({pid for _, _, pid in collections}) >= 2 and len(collections) >= 5, collections
        for (_, end, _), (start, _, _) in zip(collections, collections[1:]):
            assert start >= end, f"two collections at once: {collections}"
        assert len([name for name in emulator.objects() if name.startswith("layers/")]) == 600
    finally:
        emulator.stop()


def test_the_lease_is_held_by_one_and_taken_over_once_expired(tmp_path, monkeypatch):
    emulator = Emulator(tmp_path / "gcs", f"nixery-lease-{uuid.uuid4().hex[:8]}").start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        instance = GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 5))
        for first, second in [(instance, GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 5))),
                              (FilesystemBackend(tmp_path / "storage"), FilesystemBackend(tmp_path / "storage"))]:
            with first.lease(60) as held:
                assert held is not None and held.renew()
                with second.lease(60) as refused:
                    assert refused is None
                held.finish(1234.5)
            with second.lease(60) as taken:
                assert taken is not None and taken.previous == 1234.5
        # A holder that died (its claim never removed, never renewed) holds no longer than its term.
        stale = GcsBackend(GcsConfig(emulator.bucket, None, None, 300, 5))
        leases = stale.lease(1)
        assert leases.__enter__() is not None
        with instance.lease(60) as refused:
            assert refused is None
        time.sleep(1.5)
        with instance.lease(60) as taken:
            assert taken is not None
    finally:
        emulator.stop()


def test_nixery_gc_prints_what_it_removed_and_kept(tmp_path):
    storage = FilesystemBackend(tmp_path / "storage")
    documents = []
    for i in range(3):
        content = b"layer%d" % i * 1000
        layer = f"sha256:{hashlib.sha256(content).hexdigest()}"
        storage.write(f"layers/{layer}", content, "application/vnd.docker.image.rootfs.diff.tar.gzip")
        document = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                               "config": {"digest": layer}, "layers": [{"digest": layer}]}).encode()
        digest = f"sha256:{hashlib.sha256(document).hexdigest()}"
        storage.write(f"layers/{digest}", document, "application/vnd.docker.distribution.manifest.v2+json")
        documents.append(digest)
    old = time.time() - 3600
    for path in (tmp_path / "storage" / "layers").iterdir():
        os.utime(path, (old, old))
    storage.touch(f"layers/{documents[2]}")  # pulled now
    env = {**NIX_ENV, "PATH": "/usr/bin:/bin", "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state"), "NIXERY_PKGS_PATH": str(tmp_path),
           "NIXERY_STORAGE_LIMIT": "9000", "PYTHONPATH": str(Path(__file__).parent.parent), "HOME": str(tmp_path)}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nixery", "gc", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    def gc(*args: str) -> str:
        result = run(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # A misspelt budget would collect nothing: refused as the server refuses it, unless listed as another's.
    typo = run(NIXERY_STORAGE_LIMT="9000")
    assert typo.returncode == 2 and typo.stdout == "", typo
    assert "NIXERY_STORAGE_LIMT is not a Nixery variable; did you mean NIXERY_STORAGE_LIMIT?" in typo.stderr
    assert run("--dry-run", NIXERY_STORAGE_LIMT="9000", NIXERY_IGNORE_VARIABLES="NIXERY_STORAGE_LIMT").returncode == 0
    dry = gc("--dry-run")
    assert dry.count("would remove sha256:") == 2 and dry.count("kept sha256:") == 1, dry
    assert f"kept {documents[2]}" in dry
    assert len(list((tmp_path / "storage" / "layers").iterdir())) == 12, "a dry run removes nothing"
    done = gc()
    assert f"removed {documents[0]}" in done and f"removed {documents[1]}" in done and "removed 2 images" in done
    left = {p.name for p in (tmp_path / "storage" / "layers").iterdir() if not p.name.endswith(".type")}
    assert documents[2] in left and documents[0] not in left and len(left) == 2


class _PulledWhileListed(FilesystemBackend):
    """Storage in which a client pulls `key` (marks it used) just after a collection listed it."""

    pulled_after_listing = ""

    def objects(self):
        yield from super().objects()
        if self.pulled_after_listing:
            time.sleep(0.01)
            self.touch(self.pulled_after_listing)


def test_an_image_is_its_forms_index_sbom_and_stored_manifest(tmp_path):
    """What a build and a pull leave for one image (a Docker manifest, its OCI form, the index
    naming it, its SBOM, the pinned record of its tag, layer records) goes as one, least recently
    used first; a layer another kept image uses stays; an image pulled while the collection ran stays."""
    from nixery import manifest, sbom
    from nixery.collector import Collector
    from nixery.config import GcConfig
    from nixery.storage import blob_key

    storage = _PulledWhileListed(tmp_path / "storage")
    shared = os.urandom(3000)

    def blob(data: bytes) -> manifest.Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        storage.put_if_absent(blob_key(digest), data, manifest.OCI_LAYER_MEDIA_TYPE)
        storage.write(f"builds/{hashlib.sha256(data).hexdigest()}", json.dumps({"digest": digest}).encode(),
                      "application/json")
        return manifest.Descriptor(manifest.OCI_LAYER_MEDIA_TYPE, digest, len(data))

    def image(n: int, used: float) -> dict[str, str]:
        layers = [blob(shared), blob(os.urandom(5000))]
        config = manifest.image_config("amd64", [d.digest for d in layers], [f"N={n}"])
        docker = manifest.image_manifest(config.descriptor(), layers)
        oci = manifest.as_oci(docker)
        index = manifest.image_index(manifest.OCI_INDEX_MEDIA_TYPE, [(oci.descriptor(), "amd64")])
        for document in (config, docker, oci, index):
            storage.put_if_absent(blob_key(document.digest), document.data, document.media_type)
        storage.write(f"manifests/{hashlib.sha256(b'%d' % n).hexdigest()}", docker.data, docker.media_type)
        sbom.referrers(storage, docker.digest)  # the SBOM artifact, made and stored as a client asks for it
        for path in [*(storage.root / "layers").iterdir(), *(storage.root / "builds").iterdir(),
                     *(storage.root / "manifests").iterdir()]:
            if path.stat().st_mtime > time.time() - 60:
                os.utime(path, (used, used))
        return {"docker": docker.digest, "oci": oci.digest, "index": index.digest, "own": layers[1].digest}

    now = time.time()
    old, mid, recent = image(0, now - 3000), image(1, now - 2000), image(2, now - 1000)
    before = {p.name for p in (storage.root / "layers").iterdir() if not p.name.endswith(".type")}
    # Each image is about 11.5K, 3K of it a layer they share: two fit in 21K, counting it once.
    collector = Collector(storage, GcConfig(storage_limit=21_000, grace=60))
    assert [len(i.manifests) for i in collector.plan().kept + collector.plan().dropped] == [5, 5, 5]

    # The oldest image, pulled (by its OCI form's digest) just after the collection listed storage, stays.
    storage.pulled_after_listing = blob_key(old["oci"])
    report = collector.collect()
    assert report.removed == [] and report.in_use >= 1 and len(report.kept) == 3
    storage.pulled_after_listing = ""

    # Now the middle one is the least recently used: it goes as one.
    report = collector.collect()
    after = {p.name for p in (storage.root / "layers").iterdir() if not p.name.endswith(".type")}
    [removed] = report.removed
    assert {blob_key(mid[form]) for form in ("docker", "oci", "index")} <= set(removed.manifests)
    gone = before - after
    assert {mid["docker"], mid["oci"], mid["index"], mid["own"]} <= gone
    assert [(name, digest) for image in (old, recent) for name, digest in image.items() if digest not in after] == []
    assert len(gone) == 7, "its config and SBOM (artifact, document) too; the shared layer stays"
    assert len(list((storage.root / "manifests").iterdir())) == 4  # two records and their type files
    records = {json.loads(p.read_bytes())["digest"] for p in (storage.root / "builds").iterdir()
               if not p.name.endswith(".type")}
    shared_digest = "sha256:" + hashlib.sha256(shared).hexdigest()
    assert records == {shared_digest, old["own"], recent["own"]}, (records, shared_digest, old, mid, recent)


class _SlowDeletes(FilesystemBackend):
    """Storage whose deletions take a while, so that a collection can be killed midway."""

    def delete(self, listed):
        time.sleep(0.02)
        return super().delete(listed)


def _collect_slowly(root: str, limit: int) -> None:
    from nixery.collector import Collector
    from nixery.config import GcConfig
    from nixery.gc_schedule import collect_once

    storage = _SlowDeletes(Path(root))
    collect_once(storage, Collector(storage, GcConfig(storage_limit=limit, grace=60)))


def test_a_worker_killed_mid_collection_leaves_the_lease_free_and_every_manifest_whole(tmp_path):
    """kill -9 of the worker collecting: the kernel lets its lease go (the master's clean-up of the
    worker's partial uploads leaves the lease file alone), what it removed leaves no manifest
    without a blob, and the next collection, at once, finishes the job."""
    import multiprocessing

    from nixery.collector import Collector, references
    from nixery.config import GcConfig
    from nixery.gc_schedule import collect_once
    from nixery.storage.filesystem import drop_partial_uploads

    storage = FilesystemBackend(tmp_path / "storage")
    for i in range(40):
        layers = [os.urandom(1000) for _ in range(3)]
        descriptors = []
        for data in layers:
            digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
            storage.write(f"layers/{digest}", data, "application/vnd.docker.image.rootfs.diff.tar.gzip")
            descriptors.append({"digest": digest})
        document = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": descriptors[0], "layers": descriptors[1:]}).encode()
        storage.write(f"layers/sha256:{hashlib.sha256(document).hexdigest()}", document,
                      "application/vnd.oci.image.manifest.v1+json")
        used = time.time() - 3600 + i  # image i + 1 pulled after image i
        for path in (storage.root / "layers").iterdir():
            if path.stat().st_mtime > time.time() - 60:
                os.utime(path, (used, used))
    limit = sum(o.size for o in storage.objects()) // 2

    def blobs(root: Path = storage.root) -> set[str]:
        return {p.name for p in (root / "layers").iterdir() if not p.name.endswith(".type")}

    def check_whole() -> None:
        """Every manifest left has all its blobs."""
        left = blobs()
        for name in left:
            refs = references((storage.root / "layers" / name).read_bytes()).blobs
            assert {key.removeprefix("layers/") for key in refs} <= left, "a manifest lost a blob"

    # What one collection that nobody stops leaves, on a copy.
    shutil.copytree(storage.root, tmp_path / "copy")
    copy = FilesystemBackend(tmp_path / "copy")
    assert collect_once(copy, Collector(copy, GcConfig(storage_limit=limit, grace=60))).complete
    before = blobs()
    worker = multiprocessing.get_context("fork").Process(target=_collect_slowly, args=(str(storage.root), limit))
    worker.start()
    deadline = time.monotonic() + 60
    while len(before - blobs()) < 30 and time.monotonic() < deadline:  # the manifests gone, some blobs too
        time.sleep(0.01)
    os.kill(worker.pid, 9)
    worker.join()
    assert 30 <= len(before - blobs()) < len(before - blobs(copy.root)), "killed midway"
    drop_partial_uploads(storage.root, worker.pid)
    assert (storage.root / "gc.lease").exists()
    check_whole()

    report = collect_once(storage, Collector(storage, GcConfig(storage_limit=limit, grace=60)))
    assert report is not None and report.complete, "the dead worker's lease went with it"
    check_whole()
    assert blobs() == blobs(copy.root), "the next collection finishes what the killed one began"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a command on another user's files")
def test_root_is_refused_on_a_service_users_storage_and_writes_nothing_there(tmp_path):
    """`nixery gc` as root, on the storage and state of a server that runs as another user, would
    leave root's folders and lease there, which the server cannot write: refused, naming the user."""
    owner = 65534  # nobody
    for name in ("storage", "state"):
        (tmp_path / name).mkdir()
        os.chown(tmp_path / name, owner, owner)
    env = {**NIX_ENV, "PATH": "/usr/bin:/bin", "STORAGE_PATH": str(tmp_path / "storage"),
           "NIXERY_STATE_DIR": str(tmp_path / "state"), "NIXERY_PKGS_PATH": str(tmp_path),
           "NIXERY_STORAGE_LIMIT": "9000", "PYTHONPATH": str(Path(__file__).parent.parent), "HOME": str(tmp_path)}
    for command in (["gc"], ["build", "--store", "hello", "-o", str(tmp_path / "hello.tar")]):
        result = subprocess.run([sys.executable, "-m", "nixery", *command], env=env,
                                capture_output=True, text=True, timeout=60)
        user = pwd.getpwuid(owner).pw_name
        assert result.returncode == 2, result
        assert f"belongs to {user}" in result.stderr and f"runuser -u {user} -- nixery" in result.stderr, result.stderr
        made = [str(p) for p in tmp_path.rglob("*") if p.stat().st_uid == 0 and p.parent != tmp_path]
        assert made == [], f"root made {made}"

