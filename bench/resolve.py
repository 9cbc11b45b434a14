#!/usr/bin/env python3
"""Resolving names in a large package set: evaluations per image and their time.

Generates a package set of ATTRS attributes (the test package set plus
generated packages with mixed-case names, as nixpkgs has them), then resolves
and builds one image of 20 names, 5 of them unknown and most of the others in
another case than the set's, the way Nixery does for an uncached image: the
helper's one evaluation (`nix-instantiate`), then `nix-store --realise` of the
derivations it instantiated. Prints each Nix command run and its time.

    python3 bench/resolve.py [--attrs 20000]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import NIX_ENV  # noqa: E402
from pkgset import make_package_set  # noqa: E402

from nixery.image import OPTIONAL_PACKAGES  # noqa: E402
from nixery.nix import Nix, SourceArgs, UnknownPackages  # noqa: E402

WIDE = r'''
{ system ? builtins.currentSystem, ... }:
let
  base = import ./pkgset { inherit system; };
  generated = builtins.listToAttrs (builtins.genList (i: {
    name = "Pkg${toString i}Tool";
    value = derivation {
      name = "pkg-${toString i}-@SALT@";
      inherit system;
      builder = "${base.busybox}/bin/busybox";
      args = [ "sh" "-c" "echo ${toString i} > $out" ];
    };
  }) @COUNT@);
in base // generated
'''


def wide_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line of the benchmarks on this set (this one, bench/suggest.py, bench/search.py):
    `--attrs`, the set's size, for `wide_set`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attrs", type=int, default=20000, help="attributes in the package set")
    return parser


def wide_set(prefix: str, attrs: int,
             on_invoke: Optional[Callable[[str], None]] = None) -> tuple[Nix, SourceArgs, int]:
    """A temporary directory (removed at exit; `prefix` names it) holding the set above with `attrs`
    attributes and store paths of its own, and Nix rooting its builds there (`on_invoke` told of
    each command): (that Nix, the set as it imports it, the generated count)."""
    os.environ.update(NIX_ENV)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)  # storage and OCI layouts: hundreds of MB
    salt = uuid.uuid4().hex[:8]
    wide = work / "wide"
    # Inside the set's directory: Nixery evaluates it in restricted mode, reading its own files only.
    make_package_set(wide / "pkgset", salt=salt)
    count = max(0, attrs - 60)  # the test package set has about 60 attributes of its own
    (wide / "default.nix").write_text(WIDE.replace("@SALT@", salt).replace("@COUNT@", str(count)))
    return Nix(600, work / "gcroots", on_invoke=on_invoke), SourceArgs("path", str(wide), str(wide)), count


def main() -> None:
    args = wide_parser(__doc__).parse_args()
    calls: list[str] = []
    nix, source, count = wide_set("nixery-resolve-", args.attrs, calls.append)

    step = count // 12
    known = ["hello", "git", "python3Packages.requests", "jq"] + [
        f"pkg{i * step}tool" for i in range(11)]  # lower case: found through the case-insensitive index
    unknown = ["nosuchpackage", "pkg-missing", "python3Packages.nosuch", "gitt", "pkg99999999tool"]
    names = sorted(known + unknown)
    assert len(names) == 20

    start = time.monotonic()
    try:
        nix.resolve(names, OPTIONAL_PACKAGES, source, "x86_64-linux")
        raise SystemExit("expected unknown packages")
    except UnknownPackages as e:
        reported = sorted(e.names)
    rejected = time.monotonic() - start
    assert reported == sorted(unknown), reported

    start = time.monotonic()
    resolved = nix.resolve(sorted(known), OPTIONAL_PACKAGES, source, "x86_64-linux")
    evaluated = time.monotonic() - start
    with nix.gc_roots() as roots:
        closure = nix.build(sorted(known), OPTIONAL_PACKAGES, source, "x86_64-linux", roots, resolved)
    built = time.monotonic() - start - evaluated

    print(f"package set: {count + 60} attributes; image of {len(names)} names, {len(unknown)} unknown")
    print(f"20 names, 5 unknown: 1 evaluation, {rejected:.2f} s, reported {len(reported)} unknown names at once")
    print(f"the 15 known names: evaluation {evaluated:.2f} s, build {built:.2f} s, "
          f"{len(closure.paths)} store paths in the closure")
    print(f"Nix commands for that image: {', '.join(calls[1:])} "
          f"({calls[1:].count('nix-instantiate')} evaluation of the package set)")


if __name__ == "__main__":
    main()
