"""The root layer: the image's `/bin`, `/etc`, `/lib` ... as symlinks into the store.

Built in Python from the store rather than with nixpkgs' `symlinkJoin`, so
that it works with any package set. The merge follows nixpkgs' `buildEnv`: a
directory that only one package provides becomes one symlink, a directory
that several provide becomes a real directory whose entries are merged, and
where two packages provide the same file the one listed first wins. Top-level
directories are always real, so that the image can add to them (`/usr/bin/env`).

Programs look up their user (`whoami`, ssh, git over ssh, postgres), so every
image gets `/etc/passwd`, `/etc/group`, `/etc/shadow` and `/etc/nsswitch.conf`
naming `root` and `nobody` (and the `nonroot` user when the image runs as it),
unless a requested package provides the file itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from .archive import Entry

CACERT_BUNDLE = "/etc/ssl/certs/ca-bundle.crt"


@dataclasses.dataclass(frozen=True)
class User:
    """An account of the image; its group has the same name and number."""

    name: str
    uid: int
    home: str
    shell: str


ROOT = User("root", 0, "/root", "/bin/sh")
NOBODY = User("nobody", 65534, "/var/empty", "/bin/false")
# The uid distroless images use for the same purpose, so policies written for those fit.
NONROOT = User("nonroot", 65532, "/home/nonroot", "/bin/sh")
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nservices: files\nprotocols: files\n"


def _account_files(users: Sequence[User]) -> dict[str, tuple[str, int]]:
    """Path in the image -> (content, mode) of the files that name the users."""
    return {
        "etc/passwd": ("".join(f"{u.name}:x:{u.uid}:{u.uid}:{u.name}:{u.home}:{u.shell}\n" for u in users), 0o644),
        "etc/group": ("".join(f"{u.name}:x:{u.uid}:\n" for u in users), 0o644),
        # Locked passwords: nobody logs in, but tools that read the file (su, login, PAM) find each user.
        "etc/shadow": ("".join(f"{u.name}:!:1::::::\n" for u in users), 0o640),
        "etc/nsswitch.conf": (NSSWITCH, 0o644),
    }


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


def root_entries(packages: Mapping[str, str], nonroot: bool = False) -> list[Entry]:
    """Entries for the root layer of an image holding `packages` (name -> store path, in image order);
    `nonroot` adds the unprivileged user the image runs as, with a home it owns."""
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
    return entries + _accounts(entries, nonroot)


def _accounts(entries: Sequence[Entry], nonroot: bool) -> list[Entry]:
    """The account files and home directories the packages do not provide themselves."""
    taken = {e.name for e in entries}
    users = [ROOT, NOBODY] + ([NONROOT] if nonroot else [])
    added = [Entry(name, "file", mode, content=content)
             for name, (content, mode) in _account_files(users).items() if name not in taken]
    if "root" not in taken:
        added.append(Entry("root", "dir", 0o700))
    if nonroot and "home/nonroot" not in taken:
        added.append(Entry("home/nonroot", "dir", 0o755, uid=NONROOT.uid, gid=NONROOT.uid))
    return added
