"""Shared fixtures: generated package sets and real Nixery servers (helpers live in support.py)."""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pkgset import make_package_set  # noqa: E402
from support import NixCounter, Server  # noqa: E402


# Most of the suite waits: on servers starting, Nix, skopeo, git and the GCS emulator. With
# pytest-xdist installed, the whole suite (`pytest` without paths) runs on this many workers,
# one module per worker at a time (module-scoped servers are started once).
PARALLEL_WORKERS = 4
# The modules that take longest (`pytest --durations=0`), handed out first so that none starts last;
# the stock Debian containers first of all (each installs Python, Nix and Nixery from the archives).
SLOWEST_MODULES = ("test_fresh_machine.py", "test_container_image.py", "test_existing_nix.py", "test_nixos_unit.py",
                   "test_gunicorn_versions.py", "test_gc.py", "test_python313.py", "test_load_names.py", "test_load.py",
                   "test_build_push.py",
                   "test_load_builds.py", "test_limits.py", "test_bounded.py", "test_feedback.py", "test_sources.py",
                   "test_first_hour.py",
                   "test_auth.py", "test_gcs.py", "test_preflight.py", "test_e2e.py", "test_sharing.py",
                   "test_nix_packaging.py", "test_nix_package_source.py", "test_git_ssh.py", "test_web.py",
                   "test_crashes.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if (whole_suite and config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None
            and "PYTEST_XDIST_WORKER" not in os.environ):
        config.option.numprocesses = PARALLEL_WORKERS
        config.option.dist = "loadscope"
        config.option.loadscopereorder = False  # the order below, not by number of tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)
    items.sort(key=rank)  # stable: the order within a module is kept


@pytest.fixture(scope="session")
def pkgset(tmp_path_factory) -> Path:
    """The shared test package set (store paths are reused across tests and runs)."""
    return make_package_set(tmp_path_factory.mktemp("pkgset"))


@pytest.fixture
def fresh_pkgset(tmp_path) -> Path:
    """A package set whose every store path is new, for tests that need a real first build."""
    return make_package_set(tmp_path / "fresh-pkgset", salt=uuid.uuid4().hex[:12])


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Factory: start_server(env={...}, workdir=None) -> a running Server; all are told to stop after the test."""
    servers: list[Server] = []

    def start(env: dict[str, str], workdir: Optional[Path] = None) -> Server:
        directory = workdir or tmp_path / f"nixery-{len(servers)}"
        directory.mkdir(parents=True, exist_ok=True)
        server = Server(directory, env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.terminate()
    _stopping.extend(servers)


# Servers told to stop at the end of their test, reaped at the end of the session: Gunicorn
# takes up to a second to stop, and no test needs to wait for the one before it to be gone.
_stopping: list[Server] = []


@pytest.fixture(scope="session", autouse=True)
def _reap_servers() -> Iterator[None]:
    yield
    for server in _stopping:
        if not server.wait():
            warnings.warn(f"nixery in {server.workdir} ignored SIGTERM for 20 s and was killed")


@pytest.fixture
def nix_counter(tmp_path) -> Iterator[NixCounter]:
    yield NixCounter(tmp_path / "nix-counter")


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, pkgset) -> Iterator[Server]:
    """One server over the shared package set for every test that only reads from it (they
    may build, but none depends on what another built or did not, nor on counts it did not take)."""
    # Failures are not remembered here: the tests that share it each count their own failed build.
    server = Server(tmp_path_factory.mktemp("shared-server"), {"NIXERY_PKGS_PATH": str(pkgset),
                                                               "NIXERY_FAILURE_TTL": "0"}).start()
    yield server
    server.stop()
