"""What a Nix process prints on stderr, kept within bounds.

The code a tag selects decides much of what Nix prints: `builtins.trace` of a
string of a hundred megabytes, as often as it likes, costs Nix that string once
but a reader that keeps every line the sum of them all (and a builder's output
is as long as the builder wants). So a line is kept up to `LINE_MAX` bytes, and
of all lines the first `HEAD_MAX` bytes and the last `TAIL_MAX` bytes: Nix's own
summary of a failure is at the end, what it started with at the beginning.
"""

from __future__ import annotations

import collections
from typing import IO, Iterator

LINE_MAX = 16 << 10
HEAD_MAX = 256 << 10
TAIL_MAX = 1 << 20


def lines(stream: IO[bytes], line_max: int = LINE_MAX) -> Iterator[str]:
    """The lines of `stream`, each cut to `line_max` bytes (saying how much was left out), read
    without ever holding more than `line_max` bytes of one."""
    while raw := stream.readline(line_max):
        if len(raw) >= line_max and not raw.endswith(b"\n"):
            dropped = 0
            while rest := stream.readline(line_max):
                dropped += len(rest)
                if rest.endswith(b"\n"):
                    break
            raw += f" [... {dropped} more bytes of this line left out]\n".encode()
        yield raw.decode(errors="replace")


class KeptLines:
    """The first `head` and the last `tail` bytes of the lines added (whole lines)."""

    def __init__(self, head: int = HEAD_MAX, tail: int = TAIL_MAX):
        self.head_max, self.tail_max = head, tail
        self.head: list[str] = []
        self.head_size = 0
        self.tail: collections.deque[str] = collections.deque()
        self.tail_size = 0
        self.dropped = 0

    def add(self, line: str) -> None:
        if self.head_size + len(line) <= self.head_max and not self.tail:
            self.head.append(line)
            self.head_size += len(line)
            return
        self.tail.append(line)
        self.tail_size += len(line)
        while self.tail_size > self.tail_max and len(self.tail) > 1:
            self.tail_size -= len(self.tail.popleft())
            self.dropped += 1

    def text(self) -> str:
        cut = [f"[... {self.dropped} lines of Nix's output left out ...]\n"] if self.dropped else []
        return "".join([*self.head, *cut, *self.tail])
