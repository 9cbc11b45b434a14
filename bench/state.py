#!/usr/bin/env python3
"""What the state database (nixery/state.py) costs the requests that use it.

1. One thread: a failure lookup (every request that may build makes one; a hit and a miss),
   remembering a failure, reading the failed derivations (every new build; the table full),
   a history write (each finished build), reading the history (the page), a login admitted
   (each password check), a build memo lookup.
2. Contention: failure lookups and history writes timed in `--workers` processes of `--threads`
   threads each, all at once on one database, as Gunicorn's workers would make them.

    python3 bench/state.py [--rounds 5000] [--workers 4] [--threads 8]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from nixery.stats import BuildStats  # noqa: E402
from nixery.config import StateLayout  # noqa: E402
from nixery.errors import RegistryError  # noqa: E402
from nixery.failures import DERIVATION_CAPACITY, FailedDerivations, FailureMemory  # noqa: E402
from nixery.history import BuildHistory, entry  # noqa: E402
from nixery.lockout import FailedLogins  # noqa: E402
from nixery.memo import BuildMemo  # noqa: E402
from nixery.nix import BuildFailed, UnknownPackages  # noqa: E402

UNKNOWN = UnknownPackages(["nosuchpackage"])


def failures(state: StateLayout) -> FailureMemory:
    return FailureMemory(state, 600, lambda e: RegistryError(404, "MANIFEST_UNKNOWN", f"unknown packages: {e}"))


def failed_build() -> dict:
    return entry(BuildStats(image="some/image", reason="building failed: ...", status=422), time.time())


def timed(fn: Callable[[int], object], rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    return (f"{name}: median {statistics.median(ordered) * 1e6:.0f} us, "
            f"p99 {ordered[int(len(ordered) * 0.99)] * 1e6:.0f} us ({len(ordered)} timed)")


def one_thread(state: StateLayout, rounds: int) -> None:
    memory = failures(state)
    for i in range(2000):
        memory.remember(f"{i:064x}", UNKNOWN)
    print(summary("failure lookup, hit", timed(lambda i: memory.recall(f"{i % 2000:064x}"), rounds)))
    print(summary("failure lookup, miss", timed(lambda i: memory.recall(f"{i + 10 ** 6:064x}"), rounds)))
    print(summary("failure remembered", timed(lambda i: memory.remember(f"{i + 10 ** 7:064x}", UNKNOWN), rounds)))
    derivations = FailedDerivations(state, 600)
    for i in range(DERIVATION_CAPACITY):
        drv = f"/nix/store/{i:032d}-x.drv"
        derivations.remember(BuildFailed("", f"error: builder for '{drv}' failed with exit code 1", drv))
    print(summary("failed derivations read, table full", timed(lambda i: derivations.recall(), rounds // 50)))
    history = BuildHistory(state)
    item = failed_build()
    print(summary("history write (a failed build)", timed(lambda i: history.record(item), rounds // 5)))
    print(summary("history read (the page's two lists)",
                  timed(lambda i: (history.builds(), history.errors()), rounds // 5)))
    logins = FailedLogins(state)
    print(summary("login admitted", timed(lambda i: logins.admit(f"10.0.{i >> 8 & 255}.{i & 255}", "alice"),
                                          rounds)))
    memo = BuildMemo(state)
    memo.remember("flight", "sha256:" + "0" * 64)
    print(summary("build memo lookup", timed(lambda i: memo.recall("flight", time.time()), rounds)))


def contend(root: str, threads: int, rounds: int, queue: multiprocessing.Queue) -> None:
    """One worker: `threads` threads each looking failures up and writing the history."""
    state = StateLayout.under(Path(root))
    memory, history = failures(state), BuildHistory(state)
    lookups: list[float] = []
    writes: list[float] = []

    def run() -> None:
        item = failed_build()
        lookups.extend(timed(lambda i: memory.recall(f"{i % 2000:064x}"), rounds))
        writes.extend(timed(lambda i: history.record(item), rounds // 10))

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put((lookups, writes))


def contention(state: StateLayout, root: Path, workers: int, threads: int, rounds: int) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.perf_counter()
    processes = [context.Process(target=contend, args=(str(root), threads, rounds // 10, queue))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    elapsed = time.perf_counter() - start
    lookups = [t for result in results for t in result[0]]
    writes = [t for result in results for t in result[1]]
    print(f"{workers} workers x {threads} threads at once ({elapsed:.1f} s in all):")
    print("  " + summary("failure lookup", lookups))
    print("  " + summary("history write", writes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nixery-bench-state-"))
    try:
        state = StateLayout.under(root)
        one_thread(state, args.rounds)
        contention(state, root, args.workers, args.threads, args.rounds)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
