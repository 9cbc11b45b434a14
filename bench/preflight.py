#!/usr/bin/env python3
"""What the start-up checks cost on a machine that is set up (issue: at most a second).

Runs `preflight.run` in process against a filesystem storage and a local package set, as
`nixery --check-config` does after loading its configuration, ROUNDS times, and prints
each round and the best and worst: the first round may build the trivial derivation, the
rest only look its output up. Beside it, the same number of `nix-build --version` calls,
the cheapest Nix command, as the floor of any check that asks Nix.

    python3 bench/preflight.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from nixery import config as configuration, preflight  # noqa: E402
from nixery.storage.filesystem import FilesystemBackend  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = Path(tmp) / "pkgs"
        pkgs.mkdir()
        (pkgs / "default.nix").write_text("{ }\n")
        env = {**os.environ, "NIXERY_PKGS_PATH": str(pkgs), "STORAGE_PATH": f"{tmp}/storage",
               "NIXERY_STATE_DIR": f"{tmp}/state"}
        config = configuration.load(env)
        storage = FilesystemBackend(config.storage_path)
        checks, floor = [], []
        for _ in range(args.rounds):
            findings: list = []
            checks.append(timed(lambda: findings.extend(preflight.run(config, env, storage))))
            assert not any(f.fatal for f in findings), findings
            floor.append(timed(lambda: subprocess.run(["nix-build", "--version"], capture_output=True, check=True)))
    print("round  preflight  nix-build --version")
    for i, (c, f) in enumerate(zip(checks, floor)):
        print(f"{i:5d}  {c * 1000:7.1f} ms  {f * 1000:7.1f} ms")
    later = checks[1:] or checks
    print(f"preflight after the first round: best {min(later) * 1000:.1f} ms, worst {max(later) * 1000:.1f} ms "
          f"(nix-build --version: best {min(floor) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
