"""default.nix's `src` holds the whole application (every module under nixery/, its .nix files,
static/), which setup.py installs from it, and everything its build-time tests import, which pass
from it.

The package's source is a `lib.fileset` of the checkout (so that editing other files does not
rebuild it), which needs Nix 2.14 or newer: Debian bookworm's Nix 2.8 cannot evaluate it. So
default.nix is evaluated here by Debian trixie's Nix (2.26) in a stock trixie container
(tests/containers.py), with nixpkgs' real lib (NIXPKGS_LIB or ../shared/nixpkgs-lib; skipped
without it) and stand-ins for nixpkgs' packages (tests/nix/fake-pkgs.nix). The source it copies
into the store comes back out, and the tests the build runs (`enabledTestPaths`) run from that
copy as the build's check phase runs them: no Nix or other program on PATH, no home.
"""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from containers import Container, stock_image
from support import ROOT, nixpkgs_lib

LIB = nixpkgs_lib()
EVALUATE = """
let
  lib = import /nixpkgs-lib;
  pkgs = import /src/tests/nix/fake-pkgs.nix { inherit lib; };
  package = import /src/default.nix { inherit pkgs lib; };
in
{
  src = "${package.args.src}";
  tests = package.args.enabledTestPaths;
  nix = builtins.nixVersion;
}
"""


def local_imports(path: Path, local: set[str]) -> set[str]:
    """The modules of the checkout's tests/ directory (or nixery) that `path` imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & local


def package_files(checkout: Path) -> set[str]:
    """The application's files in `checkout`: nixery/ (Python and Nix) and static/, as relative paths."""
    return {path.relative_to(checkout).as_posix() for directory in ("nixery", "static")
            for path in (checkout / directory).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.mark.skipif(LIB is None, reason="nixpkgs' lib not found: set NIXPKGS_LIB, or provide ../shared/nixpkgs-lib")
def test_the_package_source_holds_what_its_tests_import(tmp_path):
    copy = tmp_path / "out"
    copy.mkdir()
    # No binary cache, no build users: only evaluation and copying sources into the store.
    nix_config = "substituters =\nbuild-users-group =\nsandbox = false"
    with Container.start(stock_image("trixie", packages=("nix-bin",)),
                         options=("-v", f"{LIB}:/nixpkgs-lib:ro", "-v", f"{copy}:/out")) as box:
        box.copy_checkout("/src")
        evaluated = box.exec(f"nix-instantiate --eval --strict --json --read-write-mode -E {shlex.quote(EVALUATE)}",
                             env={"NIX_CONFIG": nix_config}, check=False)
        assert evaluated.returncode == 0, evaluated.stdout
        result = json.loads(evaluated.stdout.strip().splitlines()[-1])
        assert tuple(int(n) for n in result["nix"].split(".")[:2]) >= (2, 14), result["nix"]
        box.exec(f"cp -r {shlex.quote(result['src'])} /out/src && chmod -R u+w /out/src")
    source = copy / "src"
    assert (source / "setup.py").is_file() and (source / "nixery" / "worker.py").is_file()

    # The whole application is in the copy (every module, the Nix helper's files, the web page's),
    # and setup.py installs all of it from there: the package's wheel holds each file.
    application = package_files(ROOT)
    assert {"nixery/preflight.py", "nixery/gc_schedule.py", "nixery/nix/preflight.nix",
            "static/page.html"} <= application
    assert application - package_files(source) == set(), "default.nix's file set lacks these"
    built = tmp_path / "built"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(built)], cwd=source,
                   check=True, capture_output=True, timeout=120)
    installed = {path.relative_to(built).as_posix() for path in built.rglob("*") if path.is_file()}
    expected = {name.replace("static/", "nixery/static/", 1) for name in application}
    assert expected - installed == set(), "setup.py does not install these"

    # Every module of tests/ (or nixery) that the tests, conftest.py and what they import import
    # is in the copy: told by name here, before pytest's less direct ImportError.
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"nixery"}
    wanted = [source / test for test in result["tests"]] + [source / "tests" / "conftest.py"]
    seen: set[Path] = set()
    missing = []
    while wanted:
        path = wanted.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in local_imports(path, local) - {"nixery"}:
            module = source / "tests" / f"{name}.py"
            if module.is_file():
                wanted.append(module)
            else:
                missing.append(f"{path.relative_to(source)} imports {name}")
    assert not missing, f"default.nix's file set lacks what the build-time tests import: {missing}"

    # The check phase: the tests run in the copy, with nothing on PATH and no home.
    empty = tmp_path / "bin"
    empty.mkdir()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *result["tests"]],
                         cwd=source, capture_output=True, text=True, timeout=300,
                         env={"PATH": str(empty), "HOME": "/homeless-shelter", "PYTHONPATH": str(source)})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
