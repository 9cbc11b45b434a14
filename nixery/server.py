"""Gunicorn, started from Python with settings that fit slow builds and large blobs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from prometheus_client import multiprocess, values

from .config import Config
from .nix import drop_gc_roots
from .state import drop_obsolete
from .storage.filesystem import drop_partial_uploads

log = logging.getLogger(__name__)


def gunicorn_options(config: Config) -> dict[str, Any]:
    server = config.server
    return {
        "bind": [server.bind],
        "workers": server.workers,
        # Gunicorn's threaded worker, reading request heads in its event loop (nixery/worker.py):
        # slow clients hold no thread, and requests waiting for a build are parked there, threadless.
        "worker_class": "nixery.worker.NixeryWorker",
        "threads": server.threads,
        # The master's heartbeat check: the worker's event loop beats while its threads build.
        "timeout": config.nix_timeout * 3 + 60,
        # A stopping worker lets builds and downloads finish this long (NIXERY_GRACE_PERIOD).
        "graceful_timeout": server.grace_period,
        "keepalive": 5,
        # No "sendfile" key: Gunicorn reads any value of that setting, True included, as --no-sendfile
        # (tests/test_config.py).
        # Unset, blobs go out with sendfile(2) (whole blobs and ranges: see nixery/limited.py).
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level.lower(),
        "proc_name": "nixery",
        # Gunicorn's control socket defaults to one path per user; several instances
        # (or test servers) on one machine would fight over it, and Nixery does not use it.
        "control_socket_disable": True,
        "child_exit": _child_exit,
        "when_ready": _when_ready,
        "logger_class": NixeryGunicornLogger,
    }


class QuietProbes(logging.Filter):
    """Gunicorn warns of every request line it cannot parse, and registry clients send one on
    every pull: skopeo and Docker try TLS first on a plain-HTTP port. The first such line of a
    process is kept (at INFO, saying what it means); later ones go to the debug log only."""

    MARK = "Invalid HTTP request line"

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or self.MARK not in record.getMessage():
            return True
        if self.seen:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("gunicorn.error").isEnabledFor(logging.DEBUG)
        self.seen = True
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg = (f"{record.getMessage()} (a client tried TLS or another protocol on this plain-HTTP port, "
                      "as registry clients do before falling back to HTTP; further ones are logged at DEBUG)")
        record.args = ()
        return True


class NixeryGunicornLogger(glogging.Logger):
    """Gunicorn's own lines (start-up, worker boots and exits) in the format of Nixery's (the root
    logger's, which logs.setup chose), so that a log collector reading JSON from stderr gets nothing
    but JSON objects; clients' TLS probes are not a warning each (`QuietProbes`)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.addFilter(QuietProbes())
        ours = next((h.formatter for h in logging.getLogger().handlers if h.formatter), None)
        for handler in self.error_log.handlers:
            handler.setFormatter(ours)


def prepare_metrics_dir(directory: Path) -> None:
    """A fresh metrics directory for the workers, made in the master before they fork.

    Fresh, or an earlier run's files would add its counts to this one's. Nixery hands the
    directory to the workers' apps and to `mark_process_dead` itself; the environment
    variable is set only because prometheus_client's multiprocess values read it when each
    one is made (the library has no other way to be told), and this is the one place that
    writes it. The library picks where values live when it is first imported, and the
    start-up check has imported it already, so it is asked to pick again now, through its
    module-level value class: the one use of it, which tests/test_web.py fails on if the
    library changes."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.get_value_class()


def local_url(config: Config) -> str:
    """The address to open on this machine: localhost when Nixery listens on every address."""
    address = config.server.listen_address
    host = ("localhost" if address in ("0.0.0.0", "::", "") else f"[{address}]" if ":" in address else address)
    return f"{host}:{config.server.port}"


def _when_ready(server: Any) -> None:
    """Once the port is bound: where to go and what to pull, the line someone starting Nixery looks for."""
    app = server.app
    host = local_url(app.config)
    log.info(f"listening on http://{host}, try: docker pull {host}/{app.example}",
             extra={"url": f"http://{host}"})


def _child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges stop counting (its counters stay in the sums, as they
    happened), and the GC roots of a build it did not finish are let go, and so are the
    partial blobs it was writing (a worker's temporary files are named by its pid)."""
    config = server.app.config
    multiprocess.mark_process_dead(worker.pid, str(config.state.prometheus))
    drop_gc_roots(config.state.gcroots, worker.pid)
    if config.storage_backend == "filesystem":
        drop_partial_uploads(config.storage_path, worker.pid)


class NixeryServer(BaseApplication):
    """Gunicorn with Nixery's settings; each worker makes its app with `app_factory`,
    its metrics summed across workers through the state layout's `prometheus` folder."""

    def __init__(self, config: Config, app_factory: Callable[..., Any], example: str = "shell"):
        self.config = config
        self.app_factory = app_factory
        self.example = example
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.config).items():
            if key in self.cfg.settings:  # older Gunicorns lack the control socket settings
                self.cfg.set(key, value)

    def load(self) -> Any:
        """Runs in each worker once its signal handlers are set: from "worker ready" on, it serves
        and stops cleanly on SIGTERM (scripts and tests wait for one line per worker)."""
        app = self.app_factory(self.config, metrics_dir=self.config.state.prometheus, collect=True)
        log.info("worker ready", extra={"pid": os.getpid()})
        return app


def run(config: Config, app_factory: Callable[..., Any], example: str = "shell") -> None:
    """Serves until stopped; `example` is the image name the start-up line suggests pulling."""
    log.info("starting nixery", extra={"config": json.loads(json.dumps(config.summary()))})
    prepare_metrics_dir(config.state.prometheus)
    drop_gc_roots(config.state.gcroots)
    drop_obsolete(config.state_dir)
    NixeryServer(config, app_factory, example).run()
