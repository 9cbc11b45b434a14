#!/usr/bin/env python3
"""Serving speed: Nixery against distribution (Debian's docker-registry 2.8.2) on the same bytes.

Puts one blob of MB MiB (half random, half base64, like a layer) and one
image manifest into both registries' filesystem storage, starts both (Nixery
as users run it: Gunicorn, its default workers and threads), and measures,
alternating between the two servers ROUNDS times in this one run:

- blob GET throughput, with curl (one process per download, body to /dev/null);
- manifest GET by digest, requests per second, with one Python client
  (http.client, one keep-alive connection, REQUESTS sequential requests).

The best rounds are compared, and the medians, so that other load on the
machine hurts both alike; every round's figures are printed too.

    python3 bench/serve.py [--mb 150] [--rounds 10] [--requests 2000]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import http.client
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import Server, free_port  # noqa: E402
from pkgset import make_package_set  # noqa: E402

REPO = "bench/serve"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"


def make_blob(path: Path, mb: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mb):
            chunk = os.urandom(1 << 20) if i % 2 == 0 else os.urandom(3 << 18).hex().encode()[:1 << 20]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def store_nixery(storage: Path, hexdigest: str, source: Path, media_type: str) -> None:
    layers = storage / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    os.link(source, layers / f"sha256:{hexdigest}")
    (layers / f"sha256:{hexdigest}.type").write_text(media_type)


def store_distribution(root: Path, hexdigest: str, source: Path, kind: str) -> None:
    v2 = root / "docker/registry/v2"
    blob = v2 / "blobs/sha256" / hexdigest[:2] / hexdigest
    blob.mkdir(parents=True, exist_ok=True)
    os.link(source, blob / "data")
    link = v2 / "repositories" / REPO / ("_manifests/revisions" if kind == "manifest" else "_layers") / "sha256" / hexdigest
    link.mkdir(parents=True, exist_ok=True)
    (link / "link").write_text(f"sha256:{hexdigest}")


def start_distribution(root: Path, port: int) -> subprocess.Popen:
    config = root / "config.yml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "cache": {"blobdescriptor": "inmemory"}},
        "http": {"addr": f"127.0.0.1:{port}"}}))  # JSON is YAML
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(root / "registry.log", "wb"), start_new_session=True)
    for _ in range(100):
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError((root / "registry.log").read_text())


def blob_seconds(base: str, digest: str, size: int) -> float:
    out = subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                          f"{base}/v2/{REPO}/blobs/{digest}"], capture_output=True, text=True, check=True).stdout
    seconds, downloaded = out.split()
    assert int(downloaded) == size, (downloaded, size)
    return float(seconds)


def manifests_per_second(port: int, digest: str, count: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    path = f"/v2/{REPO}/manifests/{digest}"
    headers = {"Accept": MANIFEST_TYPE}
    start = time.monotonic()
    for _ in range(count):
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    seconds = time.monotonic() - start
    connection.close()
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=150, help="MiB in the blob")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000, help="manifest GETs per round")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-serve-"))
    atexit.register(shutil.rmtree, work, True)  # storage and OCI layouts: hundreds of MB
    blob = work / "blob"
    blob_hex = make_blob(blob, args.mb)
    size = blob.stat().st_size
    config = work / "config.json"
    config.write_bytes(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    config_hex = hashlib.sha256(config.read_bytes()).hexdigest()
    manifest = work / "manifest.json"
    manifest.write_bytes(json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "size": config.stat().st_size, "digest": f"sha256:{config_hex}"},
        "layers": [{"mediaType": LAYER_TYPE, "size": size, "digest": f"sha256:{blob_hex}"}]}).encode())
    manifest_hex = hashlib.sha256(manifest.read_bytes()).hexdigest()

    nixery_dir, registry_dir = work / "nixery", work / "registry"
    for hexdigest, source, media_type, kind in ((blob_hex, blob, LAYER_TYPE, "layer"),
                                                (config_hex, config, CONFIG_TYPE, "layer"),
                                                (manifest_hex, manifest, MANIFEST_TYPE, "manifest")):
        store_nixery(nixery_dir / "storage", hexdigest, source, media_type)
        store_distribution(registry_dir, hexdigest, source, kind)

    nixery = Server(nixery_dir, {"NIXERY_PKGS_PATH": str(make_package_set(work / "pkgset"))})
    nixery.start()
    port = free_port()
    registry = start_distribution(registry_dir, port)
    servers = {"nixery": (nixery.url, nixery.port), "distribution": (f"http://127.0.0.1:{port}", port)}
    blob_times: dict[str, list[float]] = {name: [] for name in servers}
    manifest_rates: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for name, (base, server_port) in servers.items():  # warm up: page cache, connections, caches
            blob_seconds(base, f"sha256:{blob_hex}", size)
            manifests_per_second(server_port, f"sha256:{manifest_hex}", 50)
        for i in range(args.rounds):
            for name, (base, server_port) in (servers.items() if i % 2 == 0 else reversed(servers.items())):
                blob_times[name].append(blob_seconds(base, f"sha256:{blob_hex}", size))
                manifest_rates[name].append(manifests_per_second(server_port, f"sha256:{manifest_hex}", args.requests))
    finally:
        nixery.stop()
        os.killpg(registry.pid, 15)
        registry.wait()

    print(f"blob of {size / 1e6:.0f} MB, curl, {args.rounds} rounds alternating (GB/s per round):")
    for name in servers:
        print(f"  {name:<13} " + " ".join(f"{size / t / 1e9:5.2f}" for t in blob_times[name])
              + f"   best {size / min(blob_times[name]) / 1e9:.2f} GB/s")
    print(f"manifest GET by digest, one keep-alive connection, {args.requests} requests a round (requests/s):")
    for name in servers:
        print(f"  {name:<13} " + " ".join(f"{r:6.0f}" for r in manifest_rates[name])
              + f"   best {max(manifest_rates[name]):.0f}/s")
    blob_ratio = min(blob_times["distribution"]) / min(blob_times["nixery"])
    manifest_ratio = max(manifest_rates["nixery"]) / max(manifest_rates["distribution"])
    print(f"ratios (nixery / distribution, best against best): blob GET {blob_ratio:.2f}x (target >= 0.9), "
          f"manifest GET by digest {manifest_ratio:.2f}x (target >= 1)")
    blob_median = statistics.median(blob_times["distribution"]) / statistics.median(blob_times["nixery"])
    manifest_median = statistics.median(manifest_rates["nixery"]) / statistics.median(manifest_rates["distribution"])
    print(f"ratios (nixery / distribution, median against median): blob GET {blob_median:.2f}x, "
          f"manifest GET by digest {manifest_median:.2f}x")


if __name__ == "__main__":
    main()
