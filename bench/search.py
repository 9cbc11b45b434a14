#!/usr/bin/env python3
"""The package search (/packages.json?q=, the page's search box) on a large package set: what listing
the names costs once per revision, and what each query costs after.

Generates the package set of bench/resolve.py (ATTRS attributes: the test package set plus
generated `Pkg<i>Tool` packages, names that all look alike), then:

1. times the evaluation that lists its top-level names (helper.nix's `attributes`), which a worker
   runs once per revision (an unpinned source's: again after suggest.UNPINNED_TTL);
2. times queries against the names held (Nix is not involved): short and long words, a typo,
   one that matches nothing.

    python3 bench/search.py [--attrs 20000] [--rounds 20]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
from resolve import wide_parser, wide_set  # noqa: E402

from nixery.search import RESULTS_MAX  # noqa: E402
from nixery.suggest import NameIndex  # noqa: E402

QUERIES = ["h", "hel", "tool", "pkg1234", "pkg19999tool", "pyhton3", "zzzzqqqq"]


def main() -> None:
    parser = wide_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="times each query is run")
    args = parser.parse_args()
    nix, source, _ = wide_set("nixery-search-", args.attrs)

    listings = []
    for _ in range(3):
        start = time.perf_counter()
        names = nix.attribute_names(source, None)[""]
        listings.append(time.perf_counter() - start)
    start = time.perf_counter()
    index = NameIndex(names)
    indexed = time.perf_counter() - start

    print(f"package set: {len(names)} top-level names")
    print(f"listing them (one evaluation): best {min(listings):.2f} s, worst {max(listings):.2f} s; "
          f"index built in {indexed * 1000:.1f} ms")
    print(f"queries, {args.rounds} rounds each (at most {RESULTS_MAX} results):")
    for query in QUERIES:
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            found, total = index.search(query, RESULTS_MAX)
            times.append(time.perf_counter() - start)
        print(f"  {query!r:16} {total:6d} found  mean {statistics.mean(times) * 1000:6.2f} ms  "
              f"max {max(times) * 1000:6.2f} ms  first: {', '.join(found[:3]) or '(none)'}")


if __name__ == "__main__":
    main()
