"""Nixery on every Gunicorn that setup.py admits: the oldest (23.0.0, Debian trixie's and NixOS
stable's), 26.0.0, and the newest release below setup.py's upper bound.

Each version gets a virtual environment of its own with Nixery's other dependencies, made once
and kept under the test cache (~/.cache/nixery-tests/gunicorn, or $XDG_CACHE_HOME's), where the
worker's tests (slow clients, parser errors as registry JSON, graceful stop, a client that stops
reading, ranges over sendfile, requests parked while they wait for a build, connections counted
for the clients a trusted proxy names) and one real pull (skopeo, umoci, the image run in a chroot) run
with that environment's Python. `test_the_gunicorn_parts_nixery_uses` pins the parts of Gunicorn
beyond its settings that nixery/threadloop.py, nixery/worker.py and nixery/server.py use; it runs
here against the installed Gunicorn and in each environment, so that an upgrade that renames or
reshapes one fails by name.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from support import ROOT, setup_py_arguments

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nixery-tests" / "gunicorn"
FIXED_VERSIONS = ("23.0.0", "26.0.0")
# The worker's tests and one real pull, run in each environment.
WORKER_TESTS = (
    "tests/test_gunicorn_versions.py::test_the_gunicorn_parts_nixery_uses",
    "tests/test_load.py::test_parser_errors_and_slow_heads_get_registry_json",
    "tests/test_load.py::test_slow_clients_take_no_capacity_and_one_address_is_capped",
    "tests/test_load.py::test_a_graceful_stop_finishes_builds_serves_their_clients_then_refuses_connections",
    "tests/test_load.py::test_a_client_that_stops_reading_loses_its_thread",
    "tests/test_load.py::test_ranges_follow_rfc_9110_on_a_real_server",
    "tests/test_limits.py::test_health_answers_while_every_thread_would_wait_for_a_build",
    "tests/test_limits.py::test_a_trusted_proxys_connections_count_for_its_clients",
    "tests/test_e2e.py::test_shell_image_runs_in_a_chroot",
)


def gunicorn_requirement() -> Requirement:
    requirements = [Requirement(r) for r in setup_py_arguments()["install_requires"]]
    return next(r for r in requirements if r.name == "gunicorn")


def environment_requirements(version: str) -> list[str]:
    """setup.py's requirements as they are (so a range that excludes `version` fails to install),
    the Gunicorn release, and what the worker's tests import besides."""
    setup = setup_py_arguments()
    test_extra = [r for r in setup["extras_require"]["test"] if Requirement(r).name in ("pytest", "requests")]
    return [*setup["install_requires"], f"gunicorn=={version}", *test_extra]


def newest_admitted() -> str:
    """The newest Gunicorn on the package index that setup.py admits (asked with the pip of an
    environment of ours: the running Python's may be Debian's, which refuses pip); when the
    index cannot be reached, the newest such environment made before."""
    spec = str(gunicorn_requirement())
    pip = environment(FIXED_VERSIONS[0]) / "bin" / "python"
    result = subprocess.run([str(pip), "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                             "--no-deps", "--ignore-installed", "--disable-pip-version-check", spec],
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        return json.loads(result.stdout)["install"][0]["metadata"]["version"]
    made = [p.name.split("-", 1)[1] for p in CACHE_DIR.glob("gunicorn-*") if (p / "ready").exists()]
    admitted = sorted((Version(v) for v in made if gunicorn_requirement().specifier.contains(v)), reverse=True)
    if not admitted:
        pytest.skip(f"the package index cannot be reached to find the newest {spec}: {result.stderr[-300:]}")
    return str(admitted[0])


def environment(version: str) -> Path:
    """A virtual environment with Gunicorn `version` and Nixery's other dependencies, made once
    (under a lock, for parallel runs) and made again when the requirements or the Python change."""
    requirements = environment_requirements(version)
    recipe = json.dumps({"python": sys.version, "requirements": requirements})
    directory = CACHE_DIR / f"gunicorn-{version}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"gunicorn-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = directory / "ready"
        if ready.exists() and ready.read_text() == recipe:
            return directory
        shutil.rmtree(directory, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True, capture_output=True, timeout=300)
        install = subprocess.run([str(directory / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                  "--disable-pip-version-check", *requirements],
                                 capture_output=True, text=True, timeout=900)
        assert install.returncode == 0, f"pip install {' '.join(requirements)} failed:\n{install.stderr[-3000:]}"
        ready.write_text(recipe)
    return directory


@pytest.mark.parametrize("version", [*FIXED_VERSIONS, "newest"])
def test_the_worker_and_a_pull_on_each_gunicorn(version, tmp_path):
    if version == "newest":
        version = newest_admitted()
    admitted = gunicorn_requirement().specifier
    assert admitted.contains(version), f"setup.py's {gunicorn_requirement()} leaves out gunicorn {version}"
    python = environment(version) / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(ROOT)
    found = subprocess.run([str(python), "-c", "import gunicorn, nixery.worker; print(gunicorn.__version__)"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert found.stdout.strip() == version, found.stderr
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                          f"--basetemp={tmp_path / 'pytest'}", *WORKER_TESTS],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and re.search(rf"\b{len(WORKER_TESTS)} passed\b", summary) and "skipped" not in summary, \
        f"gunicorn {version}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


def test_the_oldest_tested_is_setup_pys_lower_bound():
    """setup.py states the tested range: its lower bound is the oldest release tested here, and
    it has an upper bound (the next major version, whose changes nobody has tried)."""
    specifiers = {s.operator: Version(s.version) for s in gunicorn_requirement().specifier}
    assert specifiers.get(">=") == Version(FIXED_VERSIONS[0])
    assert "<" in specifiers and specifiers["<"].release[1:] in ((), (0,), (0, 0))


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_gunicorn_parts_nixery_uses(tmp_path, monkeypatch):
    """What Nixery uses of Gunicorn besides its settings, by name and shape (run on each version
    by the test above): the base worker, the HTTP/1 parser and its buffer, the WSGI response,
    the parser's errors, the logger and the application class."""
    from gunicorn import glogging, util
    from gunicorn.app.base import BaseApplication
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http import RequestParser, errors, wsgi
    from gunicorn.workers import base

    from nixery import config
    from nixery.server import NixeryServer, gunicorn_options

    # The base worker: constructed by the arbiter, its signal handlers and hooks overridden (the
    # app it loads into `wsgi` is wrapped to offer parking).
    assert parameters(base.Worker.__init__) == ["self", "age", "ppid", "sockets", "app", "timeout", "cfg", "log"]
    for name, expected in {"init_process": ["self"], "notify": ["self"], "run": ["self"], "load_wsgi": ["self"],
                           "handle_exit": ["self", "sig", "frame"], "handle_quit": ["self", "sig", "frame"],
                           "handle_error": ["self", "req", "client", "addr", "exc"]}.items():
        assert parameters(getattr(base.Worker, name)) == expected, name
    cfg = GunicornConfig()
    log = glogging.Logger(cfg)
    worker = base.Worker(1, os.getppid(), [], object(), 30, cfg, log)
    for name in ("alive", "nr", "ppid", "sockets", "app", "cfg", "log"):
        assert hasattr(worker, name), name
    for name in ("threads", "worker_connections", "keepalive", "graceful_timeout"):
        assert isinstance(getattr(cfg, name), int), name

    # The parser reads a head given back with `unread`, and what it read past the request stays
    # in `unreader.buf` (how a pipelined request is noticed).
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert parameters(RequestParser.__init__)[:4] == ["self", "cfg", "source", "source_addr"]
        parser = RequestParser(cfg, ours, ("127.0.0.1", 1))
        parser.unreader.unread(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n")
        request = next(parser)
        assert (request.method, request.path) == ("GET", "/v2/") and request.body.read(8192) == b""
        assert parser.unreader.buf.getvalue() == b"GET /next HTTP/1.1\r\n"

        # The WSGI response, as the worker drives it.
        assert parameters(wsgi.create)[:5] == ["req", "sock", "client", "server", "cfg"]
        response, environ = wsgi.create(request, ours, ("127.0.0.1", 1), ("127.0.0.1", 2), cfg)
        assert issubclass(environ["wsgi.file_wrapper"], wsgi.FileWrapper)
        response.start_response("200 OK", [("Content-Length", "2")])
        assert not response.headers_sent
        response.write(b"ok")
        response.close()
        assert response.headers_sent and not response.should_close()
        response.force_close()
        assert response.should_close()
        assert parameters(response.write_file) == ["respiter"]
        theirs.settimeout(5)
        assert theirs.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    util.close(ours)

    # The parser's errors the worker answers with registry JSON.
    for name in ("ParseException", "LimitRequestLine", "LimitRequestHeaders", "UnsupportedTransferCoding",
                 "ForbiddenProxyRequest"):
        assert issubclass(getattr(errors, name), errors.ParseException), name
    assert issubclass(errors.NoMoreData, OSError)

    # The logger (JSON lines) and the application (settings from Nixery's Config).
    assert parameters(glogging.Logger.setup) == ["self", "cfg"] and hasattr(log, "error_log")
    assert {"load_config", "load"} <= set(vars(BaseApplication))
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    server = NixeryServer(config.load({"NIXERY_PKGS_PATH": str(tmp_path)}), lambda *args, **kwargs: None)
    options = gunicorn_options(server.config)
    missing = set(options) - set(server.cfg.settings)
    assert missing <= {"control_socket_disable"}, missing  # older Gunicorns have no control socket
    assert server.cfg.worker_class_str == "nixery.worker.NixeryWorker" and server.cfg.threads == options["threads"]
