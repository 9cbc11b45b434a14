"""Popularity data: how many packages depend on each store path name.

Loaded once at start-up from NIX_POPULARITY_URL (an http(s) URL or a file),
in the original Nixery's format: a JSON object of store path name (without
the hash) to a count. Without it, layering reads popularity off each image's
own closure graph. `nixery popularity` (or `python -m nixery.popularity`)
computes the data for a package set from its packages' closures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .layers import StorePath


class PopularityError(Exception):
    pass


def load(url: Optional[str], timeout: float = 30) -> dict[str, int]:
    if not url:
        return {}
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=timeout) as response:
                raw = response.read()
        else:
            with open(url, "rb") as f:
                raw = f.read()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise PopularityError(f"NIX_POPULARITY_URL={url}: cannot load popularity data: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise PopularityError(f"NIX_POPULARITY_URL={url}: expected a JSON object of name -> count")
    return {str(k): int(v) for k, v in data.items()}


def count(closures: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Store path name (without the hash) -> how many packages' closures hold a path of that name."""
    counts: dict[str, int] = {}
    for paths in closures.values():
        for name in {os.path.basename(path).split("-", 1)[-1] for path in paths}:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def closures_of(outputs: Mapping[str, str], paths: Mapping[str, StorePath]) -> dict[str, set[str]]:
    """Each package's runtime closure, from the references `nix path-info` reported."""
    closures = {}
    for package, output in outputs.items():
        seen, stack = set(), [output]
        while stack:
            path = stack.pop()
            if path not in seen and path in paths:
                seen.add(path)
                stack.extend(paths[path].references)
        closures[package] = seen
    return closures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nixery popularity",
        description="Computes popularity data (NIX_POPULARITY_URL's format) for a package set: for each "
                    "store path name, how many of the set's packages have it in their runtime closure.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", help="a directory holding the package set (its default.nix)")
    source.add_argument("--tarball", help="the URL of a tarball of the package set (a nixpkgs archive)")
    parser.add_argument("--attr", action="append", dest="attrs",
                        help="a package to count (dotted attribute path; repeatable); default: all of them")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--build", action="store_true",
                       help="build packages whose outputs are not in the store (otherwise they are skipped)")
    where.add_argument("--store", help="read the closures from this store instead of the local one, for example "
                                       "the binary cache the set is built into (file://..., s3://..., https://...)")
    parser.add_argument("--system", default=None, help="the system to evaluate for (default: this machine's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds each Nix command may take")
    parser.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)

    from .nix import Nix, NixError, SourceArgs
    kind, argument = ("path", os.path.abspath(args.path)) if args.path else ("tarball", args.tarball)
    system = args.system or f"{os.uname().machine}-linux"
    # Nix records its running processes in its GC-root directory (for a worker's crash): a scratch one here.
    scratch = tempfile.TemporaryDirectory(prefix="nixery-popularity-")
    nix = Nix(args.timeout, gcroot_dir=Path(scratch.name))
    try:
        packages = nix.list_packages(SourceArgs(kind, argument, argument), system, args.attrs)
        outputs = {name: out for name, (out, _) in packages.items()}
        missing = nix.invalid(sorted(set(outputs.values())), args.store)
        if missing and args.build:
            try:
                nix.realise(sorted({drv for out, drv in packages.values() if out in missing}), keep_going=True)
            except NixError as e:  # packages that fail to build are skipped, as those not built
                print(f"nixery popularity: {e.reason}", file=sys.stderr)
            missing = nix.invalid(sorted(missing))
        present = {name: out for name, out in outputs.items() if out not in missing}
        paths = nix.closure(sorted(set(present.values())), args.store) if present else {}
    except NixError as e:
        print(f"nixery popularity: {e.reason}", file=sys.stderr)
        return 1
    finally:
        scratch.cleanup()
    data = json.dumps(count(closures_of(present, paths)), indent=1, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(data)
    else:
        sys.stdout.write(data)
    print(f"nixery popularity: {len(present)} packages counted, {len(outputs) - len(present)} not in the "
          f"store skipped{'' if args.build or args.store else ' (--build builds them)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
