"""Gunicorn, started from Python with settings that fit slow builds and large blobs."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from gunicorn.app.base import BaseApplication

from .config import Config

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
        "sendfile": True,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level.lower(),
        "proc_name": "nixery",
        # Gunicorn's control socket defaults to one path per user; several instances
        # (or test servers) on one machine would fight over it, and Nixery does not use it.
        "control_socket_disable": True,
    }


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
    NixeryServer(config, app_factory).run()
