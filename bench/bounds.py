#!/usr/bin/env python3
"""What the bounds on one request cost and save (issue 20).

1. An evaluation that allocates without bound (`builtins.genList (x: x) N`, forced) run
   through Nixery's Nix runner without a memory bound and with NIXERY_EVAL_MEMORY's bound:
   wall time and the evaluation's peak RSS each way.
2. The failed-derivation check every new build makes: reading the table of failed derivations
   (empty, and full), and listing the derivations an image needs (`nix-store --query
   --requisites`, made only while some failed derivation is remembered) for the test set's
   largest image.

    python3 bench/bounds.py [--elements 30000000] [--memory 256M] [--rounds 5]
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import NIX_ENV  # noqa: E402
from pkgset import make_package_set  # noqa: E402

from nixery.config import ConfigError, StateLayout, format_size, load  # noqa: E402
from nixery.failures import DERIVATION_CAPACITY, FailedDerivations  # noqa: E402
from nixery.nix import BuildFailed, EvalBounds, EvaluationLimit, Nix, SourceArgs  # noqa: E402

HOG = r'''
{ system ? builtins.currentSystem, ... }: {
  hog = derivation {
    name = "hog"; inherit system; builder = "/bin/sh"; salt = "@SALT@";
    forced = builtins.deepSeq (builtins.genList (x: x) @ELEMENTS@) "done";
  };
}
'''


def peak_rss_of_children() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def evaluate(nix: Nix, source: SourceArgs) -> tuple[float, str]:
    start = time.monotonic()
    try:
        nix.resolve(["hog"], [], source, "x86_64-linux")
        outcome = "evaluated"
    except EvaluationLimit as e:
        outcome = f"refused: {e.reason}"
    return time.monotonic() - start, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=30_000_000, help="list elements the evaluation forces")
    parser.add_argument("--memory", default="256M", help="NIXERY_EVAL_MEMORY for the bounded run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each timing of the failure check")
    args = parser.parse_args()
    os.environ.update(NIX_ENV)
    try:
        memory = load({"HOME": "/root", "NIXERY_EVAL_MEMORY": args.memory}).limits.eval_memory
    except ConfigError as e:
        raise SystemExit(str(e))

    work = Path(tempfile.mkdtemp(prefix="nixery-bounds-"))
    atexit.register(shutil.rmtree, work, True)
    hog = work / "hog"
    hog.mkdir()
    (hog / "default.nix").write_text(HOG.replace("@SALT@", uuid.uuid4().hex[:8])
                                     .replace("@ELEMENTS@", str(args.elements)))
    source = SourceArgs("path", str(hog), str(hog))

    # Bounded first: RUSAGE_CHILDREN's peak is the largest of all children so far.
    bounded, outcome = evaluate(Nix(600, work / "gcroots", eval_bounds=EvalBounds(memory, 600)), source)
    bounded_rss = peak_rss_of_children()
    print(f"genList of {args.elements} elements, forced, bounded at {format_size(memory)}: {bounded:.2f} s, "
          f"peak RSS {format_size(bounded_rss)}; {outcome}")
    unbounded, outcome = evaluate(Nix(600, work / "gcroots", eval_bounds=EvalBounds(0, 600)), source)
    print(f"the same without a bound: {unbounded:.2f} s, peak RSS {format_size(peak_rss_of_children())}; "
          f"{outcome}")

    failed = FailedDerivations(StateLayout.under(work), 600)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        failed.recall()
        times.append(time.perf_counter() - start)
    print(f"reading the failed derivations, none remembered: best {min(times) * 1000:.2f} ms, "
          f"median {statistics.median(times) * 1000:.2f} ms")
    for i in range(DERIVATION_CAPACITY * 2):
        failed.remember(BuildFailed("", f"error: builder for '/nix/store/{i:032d}-x.drv' failed with exit code 1",
                                    f"/nix/store/{i:032d}-x.drv"))
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        live = failed.recall()
        times.append(time.perf_counter() - start)
    print(f"reading the failed derivations, table full ({len(live)} kept of {DERIVATION_CAPACITY * 2} "
          f"remembered): best {min(times) * 1000:.2f} ms, median {statistics.median(times) * 1000:.2f} ms")

    pkgset = make_package_set(work / "pkgset", salt=uuid.uuid4().hex[:8])
    nix = Nix(600, work / "gcroots")
    names = ["git", "python3Packages.requests", "nodejs", "vim", "curl"]
    resolved = nix.resolve(names, [], SourceArgs("path", str(pkgset), str(pkgset)), "x86_64-linux")
    wanted = sorted({drv.split("!")[0] for drv in resolved.derivations.values()})
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        needed = nix.requisites(wanted)
        times.append(time.perf_counter() - start)
    print(f"listing the derivations an image of {len(names)} packages needs ({len(needed)} .drv files; "
          f"nixpkgs images need thousands): best {min(times) * 1000:.1f} ms, median "
          f"{statistics.median(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
