#!/usr/bin/env python3
"""Costs at scale: manifest and blob GET latency, start-up time and memory with 100, 1,000 and
10,000 images in storage.

The images are written straight into filesystem storage through the storage backend's API,
as a build stores them: each one's package layer and root layer (real gzip'd tars, made by
nixery/archive.py) with their content-keyed records, a base layer all of them share, the
image config and manifest (nixery/manifest.py), and the pinned manifest record that a tag is
answered from, under the cache key the builder computes for a git package set's commit.
Building 10,000 images with Nix would take hours on this machine; what is measured here is
what serving costs once they are stored, which does not depend on how they got there.

For each size (images are added to the same storage, smallest size first), a real server
(Gunicorn, two workers) is started on that storage and the script measures:

- start-up: from starting `python -m nixery` until every worker is ready and /v2/ answers;
- manifest GET by tag, and blob GET by digest (a package layer), of images picked at random,
  one keep-alive connection, REQUESTS of each per round, latency per request: the median over
  ROUNDS rounds of each round's p50 and p99 (other load on the machine shows in single rounds,
  which are printed too);
- RSS of the master and workers together after the requests;

and then, with the server stopped, what a collection of that storage costs (nixery/collector.py,
under the lease, as a worker's schedule runs it):

- list: the listing of storage alone (what every collection starts with);
- gc: a collection with no budget in a new collector (every manifest read and parsed), which
  removes nothing;
- again: the same in the same collector, what the schedule pays each interval (manifests are
  content-addressed, so their references are remembered);
- half: a collection under a limit of half the bytes stored, with no grace period: the least
  recently pulled half of the images is removed (they are stored again before the next size,
  untimed).

    python3 bench/scale.py [--sizes 100,1000,10000] [--requests 2000] [--rounds 5] [--dir DIR]

The storage lives in a temporary folder (under /dev/shm when it is there, so that filling it
is not bound by the disk's fsyncs); --dir keeps it elsewhere.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from load_support import git_source  # noqa: E402
from pkgset import make_package_set  # noqa: E402
from support import Server  # noqa: E402

from nixery import archive, config, image, manifest, rootfs  # noqa: E402
from nixery.app import make_source  # noqa: E402
from nixery.builder import Builder  # noqa: E402
from nixery.collector import Collector  # noqa: E402
from nixery.config import GcConfig  # noqa: E402
from nixery.gc_schedule import collect_once  # noqa: E402
from nixery.nix import Nix  # noqa: E402
from nixery.storage import Backend, blob_key  # noqa: E402
from nixery.storage.filesystem import FilesystemBackend  # noqa: E402
from nixery.uploads import RECORD_VERSION  # noqa: E402

TAG = "latest"


def image_name(i: int) -> str:
    return f"img{i:05d}"


def store_layer(storage: Backend, content: str, entries: list[archive.Entry]) -> archive.LayerDigests:
    """One layer as uploads.py stores it: the archive streamed into storage, then its record."""
    with storage.upload() as upload:
        digests = archive.write_layer(upload.file, entries=entries)
        upload.commit(blob_key(digests.digest), archive.LAYER_MEDIA_TYPE)
    record = hashlib.sha256(f"{RECORD_VERSION}\n{content}".encode()).hexdigest()
    storage.write(f"builds/{record}", json.dumps(dataclasses.asdict(digests)).encode(), "application/json")
    return digests


def store_image(storage: Backend, builder: Builder, resolved, i: int, base: archive.LayerDigests) -> str:
    """Stores image `i` and returns the digest of its package layer."""
    name = image_name(i)
    store_path = f"/nix/store/{hashlib.sha256(name.encode()).hexdigest()[:32]}-{name}"
    package = store_layer(storage, f"paths\n{store_path}", [
        archive.Entry(store_path[1:], "dir"), archive.Entry(f"{store_path[1:]}/bin", "dir"),
        archive.Entry(f"{store_path[1:]}/bin/{name}", "file", content=os.urandom(1536).hex())])
    entries = rootfs.root_entries({name: store_path}) + [archive.Entry("bin", "dir"),
                                                        archive.Entry(f"bin/{name}", "symlink",
                                                                      target=f"{store_path}/bin/{name}")]
    root = store_layer(storage, f"root\n{json.dumps([dataclasses.astuple(e) for e in entries])}", entries)
    layers = [base, package, root]
    config_doc = manifest.nixery_config("amd64", [d.diff_id for d in layers],
                                        [["/nix/store/base"], [store_path]], [name], shell=False,
                                        source_url=resolved.source_url, revision=resolved.revision)
    document = manifest.image_manifest(config_doc.descriptor(), [
        manifest.Descriptor(archive.LAYER_MEDIA_TYPE, d.digest, d.size) for d in layers])
    for blob in (config_doc, document):
        storage.put_if_absent(blob_key(blob.digest), blob.data, blob.media_type)
    keys = builder.admission.keys(image.parse(name, TAG), resolved)
    storage.write(f"manifests/{keys.cache}", document.data, document.media_type)
    return package.digest


def latencies(port: int, paths: list[str], accept: str) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    seconds = []
    for path in paths:
        start = time.perf_counter()
        connection.request("GET", path, headers={"Accept": accept})
        response = connection.getresponse()
        response.read()
        seconds.append(time.perf_counter() - start)
        assert response.status == 200, (path, response.status)
    connection.close()
    return seconds


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_bytes(pid: int) -> int:
    """RSS of `pid` and its children (the master and its workers)."""
    total = 0
    pids = [pid] + [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def timed(run):
    """Seconds `run()` took, and what it returned."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def collections(storage: Backend) -> tuple[dict[str, float], int, int]:
    """The seconds each collection (see the docstring) took, the objects the half one removed, and
    the number of images it removed."""
    seconds: dict[str, float] = {}
    seconds["list"], listed = timed(lambda: list(storage.objects()))
    collector = Collector(storage, GcConfig())
    seconds["gc"], report = timed(lambda: collect_once(storage, collector))
    assert report is not None and report.removed_objects == 0, report
    seconds["again"], _ = timed(lambda: collect_once(storage, collector))
    collector.gc = GcConfig(storage_limit=sum(o.size for o in listed) // 2, grace=0)
    seconds["half"], report = timed(lambda: collect_once(storage, collector))
    assert report is not None and report.complete, report
    return seconds, report.removed_objects, len(report.removed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="numbers of images, comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="manifest GETs and blob GETs per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size (the median round is reported)")
    parser.add_argument("--dir", type=Path, help="where storage and state live (default: a temporary folder)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    shm = Path("/dev/shm")
    work = args.dir or Path(tempfile.mkdtemp(prefix="nixery-scale-", dir=shm if shm.is_dir() else None))
    if not args.dir:
        atexit.register(shutil.rmtree, work, True)
    packages = make_package_set(work / "pkgset")
    env = {"HOME": str(work), "NIXERY_PKGS_REPO": git_source(packages, work / "pkgs.git"),
           "STORAGE_PATH": str(work / "storage"), "NIXERY_STATE_DIR": str(work / "state")}
    cfg = config.load(env)
    storage = FilesystemBackend(cfg.storage_path)
    source = make_source(cfg)
    resolved = source.resolve(TAG)
    builder = Builder(storage, Nix(cfg.nix_timeout, cfg.state.gcroots), source, {}, cfg.layer_budget, cfg.state,
                      platforms=(image.AMD64,))
    base = store_layer(storage, "paths\n/nix/store/base", [archive.Entry("nix/store/base", "dir")])

    layers: list[str] = []  # the package layer of each image stored
    rng = random.Random(21)
    print(f"{'images':>7} {'fill s':>7} {'start s':>8} {'manifest p50 ms':>16} {'p99 ms':>7} "
          f"{'blob p50 ms':>12} {'p99 ms':>7} {'RSS MiB':>8} {'list s':>7} {'gc s':>7} {'again s':>8} {'half s':>7}")
    for size in sizes:
        start = time.monotonic()
        layers += [store_image(storage, builder, resolved, i, base) for i in range(len(layers), size)]
        fill = time.monotonic() - start
        (work / "server").mkdir(exist_ok=True)
        server = Server(work / "server", env)
        start = time.monotonic()
        server.start(timeout=120)
        startup = time.monotonic() - start
        try:
            warm = [f"/v2/{image_name(rng.randrange(size))}/manifests/{TAG}" for _ in range(200)]
            latencies(server.port, warm, manifest.MANIFEST_MEDIA_TYPE)
            rounds: dict[str, list[list[float]]] = {"manifest": [], "blob": []}
            for _ in range(args.rounds):
                picks = [rng.randrange(size) for _ in range(args.requests)]
                rounds["manifest"].append(latencies(server.port, [f"/v2/{image_name(i)}/manifests/{TAG}"
                                                                  for i in picks], manifest.MANIFEST_MEDIA_TYPE))
                rounds["blob"].append(latencies(server.port, [f"/v2/{image_name(i)}/blobs/{layers[i]}"
                                                              for i in picks], "*/*"))
            rss = rss_bytes(server.proc.pid)
        finally:
            server.stop()
        figures = {kind: (statistics.median(percentile(r, 0.5) for r in runs) * 1e3,
                          statistics.median(percentile(r, 0.99) for r in runs) * 1e3,
                          [round(percentile(r, 0.99) * 1e3, 1) for r in runs]) for kind, runs in rounds.items()}
        gc, removed_objects, removed_images = collections(storage)
        print(f"{size:>7} {fill:>7.1f} {startup:>8.2f} {figures['manifest'][0]:>16.2f} {figures['manifest'][1]:>7.2f} "
              f"{figures['blob'][0]:>12.2f} {figures['blob'][1]:>7.2f} {rss / 2**20:>8.0f} {gc['list']:>7.3f} "
              f"{gc['gc']:>7.3f} {gc['again']:>8.3f} {gc['half']:>7.3f}", flush=True)
        print(f"        p99 of each round (ms): manifest {figures['manifest'][2]}, blob {figures['blob'][2]}; "
              f"half removed {removed_images} images, {removed_objects} objects", flush=True)
        for i in range(size):  # the images the half collection removed, stored again for the next size
            if storage.stat(blob_key(layers[i])) is None:
                layers[i] = store_image(storage, builder, resolved, i, base)


if __name__ == "__main__":
    main()
