"""What one manifest request did: the figures the builder fills in and the API completes,
read by the metrics, the build history and the log.

A module of its own, below all of them, so that those readers need not import the builder.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

# A package's build failed: a 4xx, since it will fail again, but a failed build all the same.
BUILD_FAILED_STATUS = 422


@dataclasses.dataclass
class BuildStats:
    """What one manifest request did; the metrics and the recent-builds page read it."""

    image: str
    tag: str = "latest"
    cached: bool = False
    layers: int = 0
    layers_built: int = 0
    layers_reused: int = 0
    bytes_written: int = 0
    bytes_reused: int = 0
    # A blob the image needed was gone (collected, lost, deleted) and was made again.
    healed: bool = False
    steps: dict[str, float] = dataclasses.field(default_factory=dict)
    # Filled in by the API when the request is over: its length and, if it failed, what the client was told
    # and, for a failure that is the operator's to fix or wait out (a 5xx), what the operator should do.
    duration: float = 0.0
    reason: Optional[str] = None
    status: int = 200
    action: Optional[str] = None

    @property
    def outcome(self) -> str:
        """built, cached, rejected (the request's fault: 4xx) or failed (a build that failed, 422,
        or the server's fault, 5xx)."""
        if self.reason is None:
            return "cached" if self.cached else "built"
        return "rejected" if self.status < 500 and self.status != BUILD_FAILED_STATUS else "failed"

    @property
    def size(self) -> int:
        """Compressed bytes of the image's layers (every layer of a build is either written or reused)."""
        return self.bytes_written + self.bytes_reused

    def add_layers(self, parts: Sequence[BuildStats]) -> None:
        """Adds the layer counts of `parts` (the layers of a build, or the platforms of an index)."""
        for part in parts:
            self.layers += part.layers
            self.layers_built += part.layers_built
            self.layers_reused += part.layers_reused
            self.bytes_written += part.bytes_written
            self.bytes_reused += part.bytes_reused
            self.healed = self.healed or part.healed


def combined(image: str, tag: str, parts: Sequence[BuildStats]) -> BuildStats:
    """One request's stats from those of the platforms it built: cached only if all were; each
    step as long as its longest run (the platforms build in parallel)."""
    stats = BuildStats(image=image, tag=tag, cached=all(p.cached for p in parts))
    stats.add_layers(parts)
    for part in parts:
        for step, seconds in part.steps.items():
            stats.steps[step] = max(stats.steps.get(step, 0.0), seconds)
    return stats
