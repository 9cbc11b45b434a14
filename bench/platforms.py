#!/usr/bin/env python3
"""What a multi-platform index costs: the first pull of an index of two platforms against the
first pull of one platform, and of both platforms one after the other.

An index names every platform's manifest digest, so its first request builds every platform not
built yet (in parallel); a client that takes one manifest, or names `arm64/`, builds only its own.
Each measurement uses a fresh package set (new store paths: a real first build) whose aarch64-linux
variant this machine builds (tests/pkgset.py, make_emulated_package_set), served by a real Nixery
with NIXERY_PLATFORMS=linux/amd64,linux/arm64, and is repeated to show the spread.

    python3 bench/platforms.py [--runs 3] [--image shell/git/curl]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from pkgset import make_emulated_package_set, make_package_set  # noqa: E402
from support import Server  # noqa: E402

LIST = ("application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.docker.distribution.manifest.v2+json")
SINGLE = "application/vnd.docker.distribution.manifest.v2+json"


def timed(server: Server, name: str, accept: str) -> float:
    start = time.monotonic()
    response = requests.get(f"{server.url}/v2/{name}/manifests/latest", headers={"Accept": accept}, timeout=600)
    response.raise_for_status()
    return time.monotonic() - start


def fresh_server(root: Path) -> Server:
    base = make_package_set(root / "base", salt=uuid.uuid4().hex[:12])
    emulated = make_emulated_package_set(root / "emulated", base)
    (root / "server").mkdir()
    return Server(root / "server", {"NIXERY_PKGS_PATH": str(emulated),
                                    "NIXERY_PLATFORMS": "linux/amd64,linux/arm64"}).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="shell/git/curl")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixery-bench-platforms-"))
    try:
        for run in range(args.runs):
            server = fresh_server(work / f"single-{run}")
            try:
                one = timed(server, args.image, SINGLE)
                both = one + timed(server, f"arm64/{args.image}", SINGLE)
            finally:
                server.stop()
            server = fresh_server(work / f"index-{run}")
            try:
                index = timed(server, args.image, LIST)
            finally:
                server.stop()
            print(f"run {run + 1}: one platform {one:.2f} s | both, one after the other {both:.2f} s | "
                  f"index of both {index:.2f} s ({index / one:.2f}x one platform)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
