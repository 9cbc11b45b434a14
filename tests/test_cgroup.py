"""Build slots from the cgroup's limits (nixery/cgroup.py), on cgroup v2 trees made in a
temporary directory the way the kernel lays them out: a pod's or a container's `cpu.max`
("QUOTA PERIOD" or "max PERIOD") and `memory.max` ("BYTES" or "max"), with limits that bind
from an ancestor cgroup as well."""

from __future__ import annotations

import os
from pathlib import Path

from nixery import cgroup, config as nixery_config

GIB = 1 << 30
CPUS = len(os.sched_getaffinity(0))


def tree(tmp_path: Path, own: str, files: dict[str, str], proc_lines: str = "") -> tuple[Path, Path]:
    """A cgroup v2 root with `files` (relative paths to contents), and a /proc/self/cgroup naming
    `own` (or holding `proc_lines`, for v1)."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    if not proc_lines:
        (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(proc_lines or f"0::{own}\n")
    return root, proc


def test_a_cpu_quota_and_a_memory_limit_bind(tmp_path):
    root, proc = tree(tmp_path, "/", {"cpu.max": "100000 100000", "memory.max": str(4 * GIB)})
    limits = cgroup.read_limits(root, proc)
    assert limits == cgroup.Limits(cpus=1, memory=4 * GIB)
    assert cgroup.build_slots(limits, eval_memory=2 * GIB) == 1


def test_a_fractional_quota_rounds_up_and_memory_caps_the_slots(tmp_path):
    root, proc = tree(tmp_path, "/", {"cpu.max": "150000 100000", "memory.max": str(3 * GIB)})
    limits = cgroup.read_limits(root, proc)
    assert limits.cpus == min(2, CPUS)
    # 3 GiB holds one evaluation of 2 GiB; unbounded evaluations (0) leave it to the CPUs.
    assert cgroup.build_slots(limits, eval_memory=2 * GIB) == 1
    assert cgroup.build_slots(limits, eval_memory=0) == limits.cpus


def test_no_limits_leave_the_machines_cpus(tmp_path):
    root, proc = tree(tmp_path, "/", {"cpu.max": "max 100000", "memory.max": "max"})
    assert cgroup.read_limits(root, proc) == cgroup.Limits(cpus=CPUS, memory=None)
    # cgroup v1, or no cgroup file system at all.
    assert cgroup.read_limits(tmp_path / "none", tmp_path / "none") == cgroup.Limits(cpus=CPUS, memory=None)


def test_an_ancestors_limit_binds_a_nested_cgroup(tmp_path):
    """A systemd slice's CPUQuota and MemoryMax above the service's own cgroup."""
    root, proc = tree(tmp_path, "/system.slice/nixery.service",
                      {"system.slice/cpu.max": "100000 100000", "system.slice/memory.max": str(GIB),
                       "system.slice/nixery.service/cpu.max": "max 100000",
                       "system.slice/nixery.service/memory.max": str(8 * GIB)})
    assert cgroup.read_limits(root, proc) == cgroup.Limits(cpus=1, memory=GIB)
    # Even a memory limit below one evaluation leaves one slot.
    assert cgroup.build_slots(cgroup.Limits(cpus=1, memory=GIB), eval_memory=2 * GIB) == 1


def test_nixery_max_builds_overrides_the_derived_default():
    assert nixery_config.load({"NIXERY_MAX_BUILDS": "7"}).limits.max_builds == 7


def test_cgroup_v1_in_a_container(tmp_path):
    """Docker on a cgroup v1 (or hybrid) host: /proc/self/cgroup names the container's path on the
    host, while /sys/fs/cgroup/cpu and /memory are the container's own cgroups."""
    proc_lines = ("9:pids:/docker/abc\n4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    root, proc = tree(tmp_path, "", {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000",
                                     "memory/memory.limit_in_bytes": str(4 * GIB)}, proc_lines)
    assert cgroup.read_limits(root, proc) == cgroup.Limits(cpus=1, memory=4 * GIB)
    unlimited, proc = tree(tmp_path / "none", "", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                                                   "memory/memory.limit_in_bytes": "9223372036854771712"}, proc_lines)
    assert cgroup.read_limits(unlimited, proc) == cgroup.Limits(cpus=CPUS, memory=None)
