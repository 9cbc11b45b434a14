#!/usr/bin/env python3
"""Pushing speed: `nixery push` against `skopeo copy` from a Nixery server, into distribution
(Debian's docker-registry 2.8.2), for the same image.

Generates a package set whose `big` package has LAYERS parts of MB MiB each (its image has
about as many layers), has a Nixery server build `big` once, and then, ROUNDS times,
alternating which goes first, into a new registry each round:

- `nixery push big` into a new repository, reusing the server's storage (nothing is built;
  its state directory is new each round, so nothing is mounted: every blob is sent);
- `skopeo copy docker://NIXERY/big docker://REGISTRY/...` into a new repository (of a new
  registry each round, so it mounts nothing either);
- `nixery push big` again into the repository it filled: every blob is there, nothing is sent.

Times include starting the process (and, for `nixery push`, evaluating the package set).

    python3 bench/push.py [--layers 4] [--mb 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from pkgset import make_package_set  # noqa: E402
from support import NIX_ENV, Server, free_port  # noqa: E402

from nixery.manifest import MANIFEST_MEDIA_TYPE  # noqa: E402


def start_distribution(root: Path) -> tuple[subprocess.Popen, str]:
    root.mkdir(parents=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}}, "http": {"addr": f"127.0.0.1:{port}"}}))
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(root / "registry.log", "wb"), start_new_session=True)
    for _ in range(100):
        try:
            requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError((root / "registry.log").read_text())


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, env=env, timeout=1800)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="parts of the `big` package (about its layers)")
    parser.add_argument("--mb", type=int, default=32, help="MiB in each part")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-bench-push-"))
    atexit.register(shutil.rmtree, work, True)
    pkgset = make_package_set(work / "pkgset", salt="bench-push", big_count=args.layers, big_mb=args.mb)
    server = Server(work / "server", {"NIXERY_PKGS_PATH": str(pkgset)})
    (work / "server").mkdir()
    server.start()
    registries: list[subprocess.Popen] = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NIXERY_", "STORAGE_PATH", "REGISTRY_AUTH"))}
    times: dict[str, list[float]] = {"nixery push": [], "skopeo copy": [], "nixery push, all there": []}
    try:
        manifest = requests.get(f"{server.url}/v2/big/manifests/latest", headers={"Accept": MANIFEST_MEDIA_TYPE},
                                timeout=1800).json()
        size = sum(layer["size"] for layer in manifest["layers"]) + manifest["config"]["size"]
        for i in range(args.rounds):
            # A new registry each round: skopeo as root keeps its blob cache in /var/lib/containers
            # whatever HOME says, and would mount blobs from the repositories of earlier rounds.
            registry, host = start_distribution(work / f"registry-{i}")
            registries.append(registry)
            home = work / f"home-{i}"
            home.mkdir()
            env = {**base, **NIX_ENV, "PYTHONPATH": str(ROOT), "NIXERY_PKGS_PATH": str(pkgset), "HOME": str(home),
                   "STORAGE_PATH": str(server.workdir / "storage"), "NIXERY_STATE_DIR": str(home / "state"),
                   "NIXERY_LOG_LEVEL": "WARNING"}
            runs = {
                "nixery push": [sys.executable, "-m", "nixery", "push", "big", f"{host}/nixery-{i}"],
                "skopeo copy": ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                                f"docker://{server.host}/big:latest", f"docker://{host}/skopeo-{i}:latest"],
            }
            for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                times[name].append(timed(runs[name], env))
            times["nixery push, all there"].append(timed(runs["nixery push"], env))
    finally:
        server.stop()
        for registry in registries:
            os.killpg(registry.pid, signal.SIGTERM)
            registry.wait()

    print(f"image `big`: {len(manifest['layers'])} layers, {size / 1e6:.0f} MB; {args.rounds} rounds "
          "(seconds per round, then the median):")
    for name, seconds in times.items():
        rate = f", {size / statistics.median(seconds) / 1e6:.0f} MB/s" if "all there" not in name else ""
        print(f"  {name:<24} " + " ".join(f"{s:6.2f}" for s in seconds)
              + f"   median {statistics.median(seconds):.2f} s{rate}")


if __name__ == "__main__":
    main()
