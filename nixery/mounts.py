"""What the mount table says of a directory: whether it lies on storage that belongs to this
container or pod alone, so that the filesystem backend can warn that replicas cannot share it.

Nixery cannot count its replicas (a pod sees no Deployment), but it can tell where its storage
directory lives: a tmpfs is the container's memory, and a Kubernetes emptyDir is a directory the
kubelet made for this pod and bind-mounts into it (its source path, the mount's root in
/proc/self/mountinfo, is under `volumes/kubernetes.io~empty-dir/`). Blobs there are seen by
no other replica (which then answers 404 for the layers of manifests this one served) and are
lost with the pod. A PersistentVolumeClaim, a host path or a network file system is none of
these, and the Docker image's volume neither.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

MOUNTINFO = Path("/proc/self/mountinfo")
_EMPTY_DIR = "/volumes/kubernetes.io~empty-dir/"


class Mount(NamedTuple):
    root: str  # the path, inside its file system, that is mounted here
    mount_point: str
    fs_type: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mountinfo: Path = MOUNTINFO) -> Optional[Mount]:
    """The mount `path` lies on (the last of those with the longest mount point that contains it:
    a later mount over the same point hides an earlier one); None if the table cannot be read."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: Optional[Mount] = None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        mount = Mount(_unescape(fields[3]), _unescape(fields[4]), fields[separator + 1])
        inside = target == mount.mount_point or target.startswith(mount.mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def pod_local(path: Path, mountinfo: Path = MOUNTINFO) -> Optional[str]:
    """What makes `path` storage of this container or pod alone, or None when nothing does."""
    mount = mount_of(path, mountinfo)
    if mount is None:
        return None
    if _EMPTY_DIR in mount.root + "/":
        return "a Kubernetes emptyDir volume"
    if mount.fs_type == "tmpfs":
        return "a tmpfs (memory)"
    return None
