"""The CPU and memory a process may use, as its cgroup and CPU affinity limit them.

A container or pod sees every core and all the memory of its node in `os.cpu_count()` and
/proc/meminfo, while its cgroup allows it a fraction: Kubernetes' CPU limit becomes a CFS quota
(`docker run --cpus 1`: cgroup v2's `cpu.max` "100000 100000", v1's `cpu.cfs_quota_us` 100000
per `cpu.cfs_period_us` 100000), its memory limit `memory.max` (v1: `memory.limit_in_bytes`).
Sizes derived from the node's figures overcommit the pod: builds that the quota throttles to a
crawl, evaluations that the kernel kills for memory. Limits set on an ancestor cgroup bind too (a
systemd slice's CPUQuota), so every level up to the hierarchy's root counts. Inside a container
the hierarchy's root is the container's own cgroup (a cgroup namespace, or v1's bind mount), and
the path /proc/self/cgroup names may not exist there: the levels that exist are read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Iterator, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number; anything this big is none.
NO_MEMORY_LIMIT = 1 << 60


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this process may use: whole CPUs (rounded up) and bytes of memory (None: no limit)."""

    cpus: int
    memory: Optional[int]


def _levels(mount: Path, path: str) -> Iterator[Path]:
    """The existing directories from `mount`/`path` up to `mount`, innermost first."""
    directory = mount / path.strip().lstrip("/")
    while True:
        if directory.is_dir():
            yield directory
        if directory == mount or mount not in directory.parents:
            return
        directory = directory.parent


def _hierarchies(root: Path, proc_cgroup: Path) -> Iterator[tuple[str, Path]]:
    """("v2", directory), ("cpu", directory) and ("memory", directory) for every level of this
    process's cgroups that can be read: v2's unified hierarchy when it is mounted at `root`,
    v1's cpu and memory controllers at `root`/cpu and `root`/memory."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not controllers:
            if (root / "cgroup.controllers").exists():
                yield from (("v2", level) for level in _levels(root, path))
            continue
        for controller in ("cpu", "memory"):
            if controller in controllers.split(","):
                yield from ((controller, level) for level in _levels(root / controller, path))


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_quota(kind: str, directory: Path) -> Optional[float]:
    """CPUs a CFS quota allows (None: no quota)."""
    if kind == "v2":
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            return int(quota) / int(period) if quota != "max" else None
        except (OSError, ValueError, ZeroDivisionError):
            return None
    quota, period = _read_int(directory / "cpu.cfs_quota_us"), _read_int(directory / "cpu.cfs_period_us")
    return quota / period if quota and quota > 0 and period else None


def _memory_max(kind: str, directory: Path) -> Optional[int]:
    limit = _read_int(directory / ("memory.max" if kind == "v2" else "memory.limit_in_bytes"))
    return limit if limit is not None and limit < NO_MEMORY_LIMIT else None


def read_limits(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Limits:
    """The tightest CPU quota and memory limit of this process's cgroups, and its CPU affinity
    (a cpuset); the machine's figures where nothing limits it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory: Optional[int] = None
    for kind, directory in _hierarchies(root, proc_cgroup):
        if kind in ("v2", "cpu"):
            quota = _cpu_quota(kind, directory)
            if quota is not None:
                cpus = min(cpus, max(1, math.ceil(quota)))
        if kind in ("v2", "memory"):
            limit = _memory_max(kind, directory)
            if limit is not None:
                memory = limit if memory is None else min(memory, limit)
    return Limits(cpus=max(1, cpus), memory=memory)


def build_slots(limits: Limits, eval_memory: int) -> int:
    """Builds to run at once when NIXERY_MAX_BUILDS is not set: one per CPU the cgroup allows,
    and no more evaluations than fit in its memory at NIXERY_EVAL_MEMORY each (0: unbounded
    evaluations, so the CPUs alone decide)."""
    slots = limits.cpus
    if limits.memory is not None and eval_memory > 0:
        slots = min(slots, limits.memory // eval_memory)
    return max(1, slots)
