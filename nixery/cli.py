"""What `nixery build`, `push` and `gc` share around their work: the configuration read once
from the environment (the server's variables, an unknown NIXERY_ one refused as the server
refuses it), the log, and their errors as one line each."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path
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
    _refuse_root_in_a_services_files(config)
    return config


def _refuse_root_in_a_services_files(config: configuration.Config) -> None:
    """Root running a command on the files of a server that runs as another user (the Debian
    and NixOS services' `nixery`) would leave what it creates there root's: storage's folders,
    the collection lease, the state database's journal. The server could no longer write them,
    and every build would fail. Refused, naming the user to run as (as `occ`, `pg_ctl` do)."""
    if os.geteuid() != 0:
        return
    places: list[tuple[str, Path]] = [("NIXERY_STATE_DIR", config.state_dir)]
    if config.storage_backend == "filesystem":
        places.append(("STORAGE_PATH", config.storage_path))
    for variable, path in places:
        try:
            owner = path.stat().st_uid
        except OSError:  # not made yet: whoever runs first owns it
            continue
        if owner != 0:
            try:
                user = pwd.getpwuid(owner).pw_name
                how = f"runuser -u {user} -- nixery ..."
            except KeyError:  # a container's uid, say, with no name here
                user = f"uid {owner}"
                how = f"setpriv --reuid={owner} --regid={owner} --clear-groups nixery ..."
            raise configuration.ConfigError(
                f"{variable}={path} belongs to {user}, and what root makes there {user} could not write "
                f"(the server would fail its builds): run this as {user} ({how})")


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
