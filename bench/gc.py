#!/usr/bin/env python3
"""What a collection of storage (nixery/collector.py) costs, by the number of images stored.

Fills a filesystem storage with N images shaped as builds leave them (a manifest, its OCI form, a
config, a root layer of its own, two layers of its own and three of ten shared base layers, a layer
record per layer), each last used at a different time, then times with the real backend:

1. a collection that keeps everything (no budget), in a fresh process: every manifest read once,
2. the same again in the same collector: what the server's schedule pays each interval,
3. a collection under a limit of half the bytes: the least recently used half removed,
4. the listing alone (what a GCS bucket's listing replaces).

    python3 bench/gc.py [--images 100,1000,10000] [--layer-kb 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from nixery import manifest  # noqa: E402
from nixery.archive import LAYER_MEDIA_TYPE  # noqa: E402
from nixery.collector import Collector  # noqa: E402
from nixery.config import GcConfig  # noqa: E402
from nixery.storage import blob_key  # noqa: E402
from nixery.storage.filesystem import FilesystemBackend  # noqa: E402


def _blob(storage: FilesystemBackend, data: bytes, media_type: str) -> manifest.Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    storage.put_if_absent(blob_key(digest), data, media_type)
    storage.write(f"builds/{hashlib.sha256(digest.encode()).hexdigest()}",
                  json.dumps({"digest": digest, "diff_id": digest, "size": len(data)}).encode(), "application/json")
    return manifest.Descriptor(media_type, digest, len(data))


def fill(storage: FilesystemBackend, images: int, layer_bytes: int) -> None:
    rng = random.Random(images)
    base = [_blob(storage, rng.randbytes(layer_bytes), LAYER_MEDIA_TYPE) for _ in range(10)]
    now = time.time()
    for i in range(images):
        own = [_blob(storage, rng.randbytes(layer_bytes), LAYER_MEDIA_TYPE) for _ in range(3)]
        layers = rng.sample(base, 3) + own
        config = manifest.image_config("amd64", [d.digest for d in layers], [f"IMAGE={i}"])
        storage.put_if_absent(blob_key(config.digest), config.data, config.media_type)
        document = manifest.image_manifest(config.descriptor(), layers)
        oci = manifest.as_oci(document)
        for doc in (document, oci):
            storage.put_if_absent(blob_key(doc.digest), doc.data, doc.media_type)
            used = now - 3600 - (images - i) * 10  # image i was pulled before image i + 1, all over an hour ago
            os.utime(storage.root / blob_key(doc.digest), (used, used))
    for path in (storage.root / "builds").iterdir():
        os.utime(path, (now - 7200, now - 7200))
    for path in (storage.root / "layers").iterdir():
        if path.stat().st_mtime > now - 3600:
            os.utime(path, (now - 7200, now - 7200))


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="100,1000,10000")
    parser.add_argument("--layer-kb", type=int, default=4)
    args = parser.parse_args()
    print(f"{'images':>7} {'objects':>8} {'stored':>9} {'cold':>8} {'warm':>8} {'half':>8} {'removed':>8} {'list':>8}")
    for count in [int(n) for n in args.images.split(",")]:
        directory = Path(tempfile.mkdtemp(prefix="nixery-bench-gc-"))
        try:
            storage = FilesystemBackend(directory / "storage")
            fill(storage, count, args.layer_kb << 10)
            listing, objects = timed(lambda: list(storage.objects()))
            stored = sum(o.size for o in objects)
            gc = GcConfig(grace=60)
            collector = Collector(storage, gc)
            cold, report = timed(collector.collect)
            assert report.removed_objects == 0
            warm, _ = timed(collector.collect)
            collector.gc = dataclasses.replace(gc, storage_limit=stored // 2)
            half, report = timed(collector.collect)
            print(f"{count:>7} {len(objects):>8} {stored >> 10:>8}K {cold:>7.3f}s {warm:>7.3f}s {half:>7.3f}s "
                  f"{report.removed_objects:>8} {listing:>7.3f}s")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
