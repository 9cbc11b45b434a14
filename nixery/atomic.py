"""Atomic file writes: a reader (another worker, another instance) sees the old file or the new, never half.

The filesystem backend's objects and their media types are written here: into a
temporary file in the same file system, flushed to disk, then renamed over the
target, which POSIX makes atomic. The temporary file is locked (`flock`) while it is
written, so that a sweep of the temporary directory (nixery/storage/filesystem.py)
tells it from one a killed process left. (State shared between workers lives in the
database of nixery/state.py.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Optional


def hold_lock(fd: int) -> None:
    """Locks the file `fd` (`flock`) for as long as it is open: whoever sweeps temporary files
    sees it in use. A file system without locks (NFS without its lock service) leaves it
    unlocked; the sweep then goes by the file's age."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


def write_atomic(path: Path, data: bytes, tmp_dir: Optional[Path] = None, prefix: str = "") -> None:
    """Replaces `path` with `data` in one step; the temporary file lives in `tmp_dir`
    (default: beside `path`), which must be on the same file system, and its name starts with `prefix`."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f"{prefix}.{path.name}.")
    try:
        hold_lock(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, path)  # still open, so still locked: no sweep takes it before
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
