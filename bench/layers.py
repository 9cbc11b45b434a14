#!/usr/bin/env python3
"""Cold layer assembly: Nixery against `tar | igzip -1 | sha256sum` over the same store paths.

Builds a generated package set with a wide closure (COUNT store paths of MB
MiB each; defaults give ~400 MB, `--count 100 --mb 10` ~1 GB), then, ROUNDS
times, side by side: the shell pipeline over exactly the image's store paths,
and a fresh Nixery (Gunicorn, one worker, empty storage) answering the first
manifest request, which archives every layer (the `upload` step it logs is
the assembly time). The worker's peak RSS is read from /proc. The best time
of each is compared, so that other load on the machine hurts both alike.

    python3 bench/layers.py [--count 80] [--mb 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import NIX_ENV, Server  # noqa: E402
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


def timed_pipeline(paths: list[str]) -> float:
    """Seconds `tar | igzip -1 | sha256sum` takes over `paths`."""
    start = time.monotonic()
    subprocess.run(["sh", "-c", 'tar -cf - "$@" 2>/dev/null | igzip -1 -c | sha256sum >/dev/null', "sh", *paths],
                   check=True)
    return time.monotonic() - start


def nixery_round(work: Path, pkgset: Path, index: int) -> tuple[float, float, float, dict, dict]:
    """One cold build of `big` by a fresh server: (assembly s, whole request s, peak RSS MB, steps, manifest)."""
    directory = work / f"nixery-{index}"
    directory.mkdir()
    server = Server(directory, {"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_WORKERS": "1", "NIX_TIMEOUT": "600"})
    server.start()
    try:
        start = time.monotonic()
        response = requests.get(f"{server.url}/v2/big/manifests/latest", timeout=3600)
        wall = time.monotonic() - start
        response.raise_for_status()
        steps = {e["step"]: e["duration"] for e in server.log_entries() if "step" in e}
        rss = worker_peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    return steps.get("upload", wall), wall, rss, steps, response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=80, help="store paths in the closure")
    parser.add_argument("--mb", type=int, default=5, help="MiB per store path")
    parser.add_argument("--rounds", type=int, default=2, help="cold builds and pipeline runs, alternated")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-bench-"))
    atexit.register(shutil.rmtree, work, True)  # storage and OCI layouts: hundreds of MB
    pkgset = make_package_set(work / "pkgset", salt=f"bench-{args.count}-{args.mb}",
                              big_count=args.count, big_mb=args.mb)
    t = time.monotonic()
    paths = closure_of(pkgset, "big")
    print(f"built the package set: {len(paths)} store paths in {time.monotonic() - t:.1f}s")
    total = int(subprocess.run(["du", "-sb", "--apparent-size", "-c", *paths], capture_output=True, text=True,
                               check=True).stdout.splitlines()[-1].split()[0])
    mb = total / 1e6
    subprocess.run(["sh", "-c", 'cat $(find "$@" -type f) > /dev/null', "sh", *paths], check=True)  # warm cache

    pipeline_times, rounds = [], []
    for i in range(args.rounds):
        seconds = timed_pipeline(paths)
        pipeline_times.append(seconds)
        rounds.append(nixery_round(work, pkgset, i))
        print(f"round {i + 1}: tar | igzip -1 | sha256sum {seconds:6.2f} s; nixery assembly {rounds[-1][0]:6.2f} s "
              f"(whole request {rounds[-1][1]:.2f} s, steps {rounds[-1][3]})")
    assembly = min(r[0] for r in rounds)
    rss = max(r[2] for r in rounds)
    manifest = rounds[0][4]
    compressed = sum(layer["size"] for layer in manifest["layers"]) / 1e6
    best_pipeline = min(pipeline_times)

    print(json.dumps({"store_paths": len(paths), "layers": len(manifest["layers"]), "cores": os.cpu_count(),
                      "input_MB": round(mb, 1), "compressed_MB": round(compressed, 1)}))
    print(f"nixery cold assembly       {assembly:7.2f} s  {mb / assembly:7.1f} MB/s  -> {compressed:.1f} MB "
          f"(best of {args.rounds})")
    print(f"nixery worker peak RSS     {rss:7.1f} MB")
    print(f"tar | igzip -1 | sha256sum {best_pipeline:7.2f} s  {mb / best_pipeline:7.1f} MB/s  (best of {args.rounds})")
    ratios = sorted(p / r[0] for p, r in zip(pipeline_times, rounds))
    print(f"ratio: nixery assembles at {best_pipeline / assembly:.2f}x the pipeline's speed, best against best "
          f"(target >= 0.8); round by round {', '.join(f'{m:.2f}' for m in ratios)}")


if __name__ == "__main__":
    main()
