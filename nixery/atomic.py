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


def write_atomic(path: Path, data: bytes, tmp_dir: Optional[Path] = None, prefix: str = "") -> None:
    """Replaces `path` with `data` in one step; the temporary file lives in `tmp_dir`
    (default: beside `path`), which must be on the same file system, and its name starts with `prefix`."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f"{prefix}.{path.name}.")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed: in use until then
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
