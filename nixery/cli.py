"""What `nixery build`, `push` and `gc` share around their work: the configuration read once
from the environment (the server's variables, an unknown NIXERY_ one refused as the server
refuses it), the log, and their errors as one line each."""

from __future__ import annotations

import os
import sys
from typing import Callable

from . import config as configuration
from .local import CommandError


def load() -> configuration.Config:
    """The configuration as the server reads it. A NIXERY_ variable that is not Nixery's (nor in
    NIXERY_IGNORE_VARIABLES) is a ConfigError here too: a typo would leave its default in place,
    and a command would build from another package set or collect by another budget than meant."""
    config = configuration.load(os.environ)
    from .preflight import misspelt_variables
    for finding in misspelt_variables(os.environ, config.ignored_variables):
        if finding.fatal:
            raise configuration.ConfigError(finding.message)
    return config


def run(command: str, action: Callable[[configuration.Config], None]) -> int:
    """Runs `action` with the configuration; 2 for a configuration error, 1 for a failure (an
    operating system error too: a file that cannot be written is the user's to fix, not a bug)."""
    try:
        config = load()
    except configuration.ConfigError as e:
        print(f"nixery {command}: configuration error: {e}", file=sys.stderr)
        return 2
    from . import logs
    logs.setup(config.log_level, config.log_format)
    try:
        action(config)
    except CommandError as e:
        print(f"nixery {command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output cannot be written, say
        print(f"nixery {command}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0
