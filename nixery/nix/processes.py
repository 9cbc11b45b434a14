"""The Nix processes a worker runs, recorded on disk so that whoever outlives the worker stops them.

Nix runs in sessions of its own (so that a timeout stops the whole group), which also
means a worker killed with SIGKILL leaves them running: a `nix-store --realise` then
finishes its build and re-creates the dead worker's GC roots after the master removed
them. So each Nix process is recorded by its worker in the GC roots folder, under a name
that starts with the worker's pid (as the worker's roots do), and the master, when it
sees the worker die (or the next start, when the whole instance was killed), stops the
processes recorded for it and waits until they are gone before dropping the roots.

A record names the process's pid and its start time (`/proc/<pid>/stat`), so a pid the
kernel has given to another process since is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

# How long a process has to exit after SIGTERM (Nix then stops its builders) before SIGKILL.
TERM_GRACE_SECONDS = 10
_POLL_SECONDS = 0.02
_RECORD = re.compile(r"(\d+)-nix-(\d+)-(\d+)")


def start_time(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks after boot), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else int(fields[19])


@contextlib.contextmanager
def recorded(directory: Path, pid: int) -> Iterator[None]:
    """Records the Nix process `pid` (a session leader) of this worker while the block runs."""
    started = start_time(pid)
    if started is None:  # gone already
        yield
        return
    record = directory / f"{os.getpid()}-nix-{pid}-{started}"
    written = False
    with contextlib.suppress(OSError):  # an unwritable state folder costs the record, not the build
        directory.mkdir(parents=True, exist_ok=True)
        record.touch()
        written = True
    try:
        yield
    finally:
        if written:
            with contextlib.suppress(FileNotFoundError):
                record.unlink()


def stop_recorded(directory: Path, owner: Optional[int] = None) -> None:
    """Stops the Nix processes recorded for worker `owner` (None: for every worker of an
    earlier run) and returns once they are gone: SIGTERM to each one's session, then
    SIGKILL to those still there after TERM_GRACE_SECONDS."""
    running: dict[int, int] = {}
    for record in directory.glob(f"{owner}-nix-*" if owner else "*-nix-*"):
        match = _RECORD.fullmatch(record.name)
        if match and start_time(int(match[2])) == int(match[3]):
            running[int(match[2])] = int(match[3])
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + TERM_GRACE_SECONDS
        while running and time.monotonic() < deadline:
            running = {pid: started for pid, started in running.items() if start_time(pid) == started}
            if running:
                time.sleep(_POLL_SECONDS)
        if not running:
            return
