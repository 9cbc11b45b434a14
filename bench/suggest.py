#!/usr/bin/env python3
""""Did you mean" on a large package set: what listing the names costs once, and each request after.

Generates the package set of bench/resolve.py (ATTRS attributes: the test package
set plus generated `Pkg<i>Tool` packages, names that all look alike, the hard case
for matching), then:

1. evaluates an image with unknown names twice, side by side: once listing the
   top-level names (what the first failed request of a source revision does) and
   once told that the names are held already (every later one);
2. times the suggestions for a set of misspelt names from the warm index, as each
   request pays them (Nix is not involved).

    python3 bench/suggest.py [--attrs 20000] [--rounds 20]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
from resolve import wide_parser, wide_set  # noqa: E402

from nixery.nix import Nix, SourceArgs, UnknownPackages  # noqa: E402
from nixery.suggest import Suggestions  # noqa: E402

MISSPELT = ["hellp", "gti", "pyhton3", "pkg1234tol", "pkg19000toool", "nodejss", "python3Packages.reqests",
            "jqq", "opensl", "zzzzqqqq"]


def evaluate(nix: Nix, source: SourceArgs, names: list[str], listed: list[str]) -> tuple[float, UnknownPackages]:
    start = time.monotonic()
    try:
        nix.resolve(names, [], source, "x86_64-linux", listed=listed)
    except UnknownPackages as e:
        return time.monotonic() - start, e
    raise SystemExit("expected unknown packages")


def main() -> None:
    parser = wide_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="times each misspelt name is looked up warm")
    args = parser.parse_args()
    nix, source, count = wide_set("nixery-suggest-", args.attrs)

    evaluate(nix, source, ["hellp"], [""])  # warm Nix's own caches (the busybox path, the file)
    listing, error = evaluate(nix, source, MISSPELT, [])
    held, _ = evaluate(nix, source, MISSPELT, ["", "python3Packages"])
    listed = sum(len(names) for names in error.listed.values())

    suggestions = Suggestions()
    start = time.perf_counter()
    suggestions.learn("bench", True, error.listed)
    indexed = time.perf_counter() - start
    times: list[float] = []
    found: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name in MISSPELT:
            start = time.perf_counter()
            found[name] = suggestions.suggest("bench", name, error.stopped_in.get(name, ""))
            times.append(time.perf_counter() - start)

    print(f"package set: {count + 60} attributes; {len(MISSPELT)} unknown names per image")
    print(f"evaluation listing the names ({listed}): {listing:.2f} s; with the names held: {held:.2f} s "
          f"(listing costs {listing - held:+.2f} s, once per source revision and worker)")
    print(f"index built in {indexed * 1000:.1f} ms")
    print(f"suggestions per name, warm: mean {statistics.mean(times) * 1000:.2f} ms, "
          f"max {max(times) * 1000:.2f} ms (target: under 50 ms per request)")
    for name in MISSPELT:
        print(f"  {name}: {', '.join(found[name]) or '(none)'}")


if __name__ == "__main__":
    main()
