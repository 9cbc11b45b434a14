"""What `nixery build` and `nixery push` share around their work: the configuration read once
from the environment (the server's variables), the log, and their errors as one line each."""

from __future__ import annotations

import os
import sys
from typing import Callable

from . import config as configuration
from .local import CommandError


def run(command: str, action: Callable[[configuration.Config], None]) -> int:
    """Runs `action` with the configuration; 2 for a configuration error, 1 for a failure (an
    operating system error too: a file that cannot be written is the user's to fix, not a bug)."""
    try:
        config = configuration.load(os.environ)
    except configuration.ConfigError as e:
        print(f"nixery {command}: configuration error: {e}", file=sys.stderr)
        return 2
    from . import logs
    logs.setup(config.log_level)
    try:
        action(config)
    except CommandError as e:
        print(f"nixery {command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output cannot be written, say
        print(f"nixery {command}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0
