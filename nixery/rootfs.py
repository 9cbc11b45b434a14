"""The root layer: the image's `/bin`, `/etc`, `/lib` ... as symlinks into the store.

Built in Python from the store rather than with nixpkgs' `symlinkJoin`, so
that it works with any package set. The merge follows nixpkgs' `buildEnv`: a
directory that only one package provides becomes one symlink, a directory
that several provide becomes a real directory whose entries are merged, and
where two packages provide the same file the one listed first wins. Top-level
directories are always real, so that the image can add to them (`/usr/bin/env`).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from .archive import Entry

CACERT_BUNDLE = "/etc/ssl/certs/ca-bundle.crt"


def _merge(target: str, sources: Sequence[str], entries: list[Entry], real_dir: bool = False) -> None:
    """Adds `target` (a path in the image) merged from the store directories `sources`."""
    if len(sources) == 1 and not real_dir:
        entries.append(Entry(target, "symlink", target=sources[0]))
        return
    entries.append(Entry(target, "dir", 0o755))
    children: dict[str, list[str]] = {}
    for source in sources:
        for name in sorted(os.listdir(source)):
            children.setdefault(name, []).append(os.path.join(source, name))
    for name in sorted(children):
        paths = children[name]
        dirs = [p for p in paths if os.path.isdir(p)]
        if dirs and len(dirs) == len(paths):
            _merge(f"{target}/{name}", dirs, entries)
        else:
            entries.append(Entry(f"{target}/{name}", "symlink", target=paths[0]))


def root_entries(packages: Mapping[str, str]) -> list[Entry]:
    """Entries for the root layer of an image holding `packages` (name -> store path, in image order)."""
    tops: dict[str, list[str]] = {}
    for store_path in dict.fromkeys(packages.values()):
        if os.path.isdir(store_path):
            for name in sorted(os.listdir(store_path)):
                # /tmp is the image's own (mode 1777), whatever a package ships there.
                if name != "tmp" and os.path.isdir(os.path.join(store_path, name)):
                    tops.setdefault(name, []).append(os.path.join(store_path, name))
    entries: list[Entry] = [Entry("tmp", "dir", 0o1777)]
    for name in sorted(tops):
        _merge(name, tops[name], entries, real_dir=True)
    env = next((e for e in entries if e.name == "bin/env" and e.kind == "symlink"), None)
    if env is not None and "usr" not in tops:
        entries += [Entry("usr", "dir", 0o755), Entry("usr/bin", "dir", 0o755),
                    Entry("usr/bin/env", "symlink", target=env.target)]
    return entries
