"""A build's layers into storage: each archived once, found again through its record.

A layer's digest is only known once it is archived, so each layer's content
(its store paths, or the root layer's entries) has a record in storage
(`builds/<hash of the content>`) naming the digests of its archive. A layer
whose record names a blob still stored is reused without reading the store;
any other is archived (tar -> compress -> hash) straight into storage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
from typing import Callable, Sequence

from . import archive, layers, rootfs
from .nix import Closure
from .stats import BuildStats
from .storage import Backend, blob_key

# Bump when the bytes a record describes would change (tar layout, compression).
RECORD_VERSION = "nixery-layer-v1"


def write_layers(storage: Backend, closure: Closure, groups: Sequence[layers.Layer], stats: BuildStats,
                 nonroot: bool = False) -> list[archive.LayerDigests]:
    """Every layer's record, the root layer last. Layers are independent, so they are
    archived on as many threads as there are cores (reading, isa-l and hashlib release
    the GIL), largest first so that no big layer starts last; each thread counts into
    its own stats, added up here. The first layer that fails fails the build at once:
    the layers not yet started are dropped (in a storage outage each would wait out
    its own retries before failing the same way)."""
    entries = rootfs.root_entries(closure.packages, nonroot)
    jobs = [(f"paths\n{chr(10).join(group.paths)}",
             lambda out, paths=group.paths: archive.write_layer(out, store_paths=paths)) for group in groups]
    jobs.append((f"root\n{json.dumps([dataclasses.astuple(e) for e in entries])}",
                 lambda out: archive.write_layer(out, entries=entries)))
    sizes = [group.size for group in groups] + [0]
    parts = [BuildStats(image=stats.image) for _ in jobs]
    with concurrent.futures.ThreadPoolExecutor(archive.THREADS, thread_name_prefix="layer") as pool:
        futures = {i: pool.submit(_layer, storage, jobs[i][0], parts[i], jobs[i][1])
                   for i in sorted(range(len(jobs)), key=lambda i: -sizes[i])}
        done, _ = concurrent.futures.wait(futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            pool.shutdown(cancel_futures=True)
            raise failed.exception()
        records = [futures[i].result() for i in range(len(jobs))]
    stats.add_layers(parts)
    return records


def _layer(storage: Backend, content: str, stats: BuildStats,
           write: Callable[..., archive.LayerDigests]) -> archive.LayerDigests:
    """A layer's record, archiving it only when no valid record exists for the same content."""
    record_key = f"builds/{hashlib.sha256(f'{RECORD_VERSION}{chr(10)}{content}'.encode()).hexdigest()}"
    raw = storage.read(record_key)
    if raw is not None:
        record = archive.LayerDigests(**json.loads(raw))
        if storage.stat(blob_key(record.digest)) is not None:
            # Marked used: a collection running now keeps it for the image being built (nixery/collector.py).
            storage.touch(blob_key(record.digest))
            stats.layers_reused += 1
            stats.bytes_reused += record.size
            return record
        stats.healed = True  # the record's blob is gone (collected, lost, deleted): archived again
    with storage.upload() as upload:
        digests = write(upload.file)
        upload.commit(blob_key(digests.digest), archive.LAYER_MEDIA_TYPE)
    storage.write(record_key, json.dumps(dataclasses.asdict(digests)).encode(), "application/json")
    stats.layers_built += 1
    stats.bytes_written += digests.size
    return digests
