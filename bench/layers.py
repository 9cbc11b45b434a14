#!/usr/bin/env python3
"""Layer assembly throughput: Nixery against `tar | gzip` and `tar | sha256sum` on the same bytes.

Builds a generated package set with a wide closure (COUNT store paths of MB
MiB each; defaults give ~400 MB), starts a real Nixery (Gunicorn, one
worker), times the first manifest request (which archives every layer), and
reads the worker's peak RSS. Then it runs the shell pipelines over exactly
the same store paths, side by side in this run, and prints ratios.

    python3 bench/layers.py [--count 80] [--mb 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import NIX_ENV, Server  # noqa: E402
from pkgset import make_package_set  # noqa: E402


def closure_of(pkgset: Path, attr: str) -> list[str]:
    env = {**os.environ, **NIX_ENV}
    out = subprocess.run(["nix-build", str(pkgset), "-A", attr, "--no-out-link"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return subprocess.run(["nix-store", "-qR", *out], capture_output=True, text=True,
                          check=True).stdout.split()


def worker_peak_rss_mb(master_pid: int) -> float:
    peak = 0
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def timed_pipeline(command: str, paths: list[str]) -> tuple[float, float]:
    """Seconds the pipeline takes over `paths`, and the MB it outputs."""
    start = time.monotonic()
    out = subprocess.run(["sh", "-c", command.replace("tar ", "tar 2>/dev/null ", 1) + " | wc -c", "sh", *paths],
                         check=True, capture_output=True, text=True).stdout
    return time.monotonic() - start, int(out) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=80, help="store paths in the closure")
    parser.add_argument("--mb", type=int, default=5, help="MiB per store path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-bench-"))
    pkgset = make_package_set(work / "pkgset", salt=f"bench-{args.count}-{args.mb}",
                              big_count=args.count, big_mb=args.mb)
    t = time.monotonic()
    paths = closure_of(pkgset, "big")
    print(f"built the package set: {len(paths)} store paths in {time.monotonic() - t:.1f}s")
    total = int(subprocess.run(["du", "-sb", "--apparent-size", "-c", *paths], capture_output=True, text=True,
                               check=True).stdout.splitlines()[-1].split()[0])
    mb = total / 1e6

    subprocess.run(["sh", "-c", 'cat $(find "$@" -type f) > /dev/null', "sh", *paths], check=True)  # warm cache
    server = Server(work / "nixery", {"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_WORKERS": "1"})
    (work / "nixery").mkdir()
    server.start()
    try:
        start = time.monotonic()
        response = requests.get(f"{server.url}/v2/big/manifests/latest", timeout=3600)
        wall = time.monotonic() - start
        response.raise_for_status()
        manifest = response.json()
        steps = {e["step"]: e["duration"] for e in server.log_entries() if "step" in e}
        rss = worker_peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    compressed = sum(layer["size"] for layer in manifest["layers"]) / 1e6
    assembly = steps.get("upload", wall)

    tar_gzip, gzip_mb = timed_pipeline('tar -cf - "$@" | gzip -6', paths)
    tar_gzip1, gzip1_mb = timed_pipeline('tar -cf - "$@" | gzip -1', paths)
    tar_sha, _ = timed_pipeline('tar -cf - "$@" | sha256sum', paths)

    print(json.dumps({"store_paths": len(paths), "layers": len(manifest["layers"]),
                      "input_MB": round(mb, 1), "compressed_MB": round(compressed, 1)}))
    print(f"nixery layer assembly      {assembly:7.2f} s  {mb / assembly:7.1f} MB/s  -> {compressed:.1f} MB"
          f"  (whole first request {wall:.2f} s, steps {steps})")
    print(f"nixery worker peak RSS     {rss:7.1f} MB")
    print(f"tar | gzip -6              {tar_gzip:7.2f} s  {mb / tar_gzip:7.1f} MB/s  -> {gzip_mb:.1f} MB")
    print(f"tar | gzip -1              {tar_gzip1:7.2f} s  {mb / tar_gzip1:7.1f} MB/s  -> {gzip1_mb:.1f} MB")
    print(f"tar | sha256sum            {tar_sha:7.2f} s  {mb / tar_sha:7.1f} MB/s")
    print(f"ratios: nixery is {tar_gzip / assembly:.2f}x as fast as tar|gzip -6, "
          f"{tar_gzip1 / assembly:.2f}x tar|gzip -1, {tar_sha / assembly:.2f}x tar|sha256sum")


if __name__ == "__main__":
    main()
