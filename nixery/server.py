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
from .logs import JsonFormatter
from .nix import drop_gc_roots

log = logging.getLogger(__name__)


def gunicorn_options(config: Config) -> dict[str, Any]:
    return {
        "bind": [f"[{config.listen_address}]:{config.port}" if ":" in config.listen_address
                 else f"{config.listen_address}:{config.port}"],
        "workers": config.workers,
        # Threads keep a worker's heartbeat alive while one of them waits on Nix.
        "worker_class": "gthread",
        "threads": config.threads,
        # A worker must outlive the longest Nix build plus archiving and upload.
        "timeout": config.nix_timeout * 3 + 60,
        "graceful_timeout": 30,
        "keepalive": 5,
        # No "sendfile" key: Gunicorn reads any value of that setting, True included, as --no-sendfile
        # (tests/test_config.py).
        # Unset, blobs go out with sendfile(2) (whole blobs and ranges: see api._LimitedReader).
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level.lower(),
        "proc_name": "nixery",
        # Gunicorn's control socket defaults to one path per user; several instances
        # (or test servers) on one machine would fight over it, and Nixery does not use it.
        "control_socket_disable": True,
        "child_exit": _child_exit,
        "logger_class": JsonGunicornLogger,
    }


class JsonGunicornLogger(glogging.Logger):
    """Gunicorn's own lines (start-up, worker boots and exits) in the JSON shape of Nixery's,
    so that a log collector reading stderr gets nothing but JSON objects."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


def prepare_metrics_dir(state_dir: Path) -> None:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the workers, made in the master before they fork.

    Fresh, or an earlier run's files would add its counts to this one's. prometheus_client
    picks where values live when it is first imported, and the start-up check has imported
    it already, so it is asked to pick again now that the directory is set."""
    directory = state_dir / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.get_value_class()


def _child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges stop counting (its counters stay in the sums, as they
    happened), and the GC roots of a build it did not finish are let go."""
    multiprocess.mark_process_dead(worker.pid)
    drop_gc_roots(server.app.config.gcroot_dir, worker.pid)


class NixeryServer(BaseApplication):
    def __init__(self, config: Config, app_factory: Callable[[Config], Any]):
        self.config = config
        self.app_factory = app_factory
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.config).items():
            if key in self.cfg.settings:  # older Gunicorns lack the control socket settings
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self.app_factory(self.config)


def run(config: Config, app_factory: Callable[[Config], Any]) -> None:
    log.info("starting nixery", extra={"config": json.loads(json.dumps(config.summary()))})
    prepare_metrics_dir(config.state_dir)
    drop_gc_roots(config.gcroot_dir)
    NixeryServer(config, app_factory).run()
