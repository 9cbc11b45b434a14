"""A file object that ends after a given number of bytes: the body of a Range response (the
server), one chunk of a chunked upload (`nixery push`)."""

from __future__ import annotations

import contextlib
from typing import BinaryIO


class LimitedReader(contextlib.AbstractContextManager):
    """`f` from where it stands, for `remaining` bytes; closing it closes `f`.

    It has the file's `fileno`, so Gunicorn sends a range with sendfile(2) from the current
    offset for Content-Length bytes; a server without sendfile reads it."""

    def __init__(self, f: BinaryIO, remaining: int):
        self.f = f
        self.remaining = remaining

    def fileno(self) -> int:
        return self.f.fileno()

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self.f.read(size)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
