"""Locks that hold across Gunicorn's worker processes (and threads): `flock` on files.

Workers share nothing in memory, so "one build per image at a time" has to
be a lock on disk. Each `open` gives its own open file description, so two
threads of one process exclude each other as two processes do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_lock(directory: Path, name: str) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / hashlib.sha256(name.encode()).hexdigest()
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
