"""Layer archives: a deterministic tar, compressed and hashed in one pass.

The same store paths must always give the same bytes, or layers would not be
shared between images. So entries come in sorted order with a fixed mtime,
uid/gid 0 and no user names, and the gzip header carries no time stamp. The
archive streams straight into storage; memory stays bounded by one chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
import tarfile
from typing import BinaryIO, Iterable, Iterator

from isal import igzip_threaded

# Nix sets every store file's mtime to 1; the root layer uses the same.
MTIME = 1
CHUNK = 1 << 20
# isa-l's level 1 compresses a little less than gzip -6 at several times its speed
# (bench/layers.py prints both); a layer is compressed once and served many times.
COMPRESSION_LEVEL = 1
LAYER_MEDIA_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Layers archived at once by one build: one per core this process may run on.
THREADS = len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class Entry:
    """A synthetic tar entry (the root layer's directories, symlinks and small text files).

    `content` is a file's text (UTF-8); `uid`/`gid` own it (the non-root user's home)."""

    name: str
    kind: str  # "dir", "symlink" or "file"
    mode: int = 0o755
    target: str = ""
    content: str = ""
    uid: int = 0
    gid: int = 0


@dataclasses.dataclass(frozen=True)
class LayerDigests:
    digest: str  # sha256 of the compressed bytes: the blob's name
    diff_id: str  # sha256 of the tar: the image config's rootfs.diff_ids
    size: int


class _HashingWriter:
    """A write-only file that hashes and counts what it passes on to `out`."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass


class _TarSink:
    """Where tarfile writes: the tar's bytes are hashed (the diff_id) and handed to the compressor."""

    def __init__(self, gz: BinaryIO):
        self.gz = gz
        self.hash = hashlib.sha256()
        # Set when the layer is given up on: what tarfile still writes to finish the stream goes nowhere.
        self.abandoned = False

    def write(self, data: bytes) -> int:
        if self.abandoned:
            return len(data)
        self.hash.update(data)
        return self.gz.write(data)


def _info(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _parents(paths: Iterable[str]) -> list[str]:
    """The directories above the given names, each once, so that unpackers create them with known modes."""
    parents = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parents.add("/".join(parts[:i]))
    return sorted(parents)


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every file below `root` (itself included), depth first, names in byte order."""
    stack = [root]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), reverse=True)
            stack.extend(os.path.join(path, n) for n in names)


def _add_store_path(tar: tarfile.TarFile, store_path: str) -> None:
    for path, st in _walk(store_path):
        name = path.lstrip("/")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            info = _info(name, mode)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        elif stat.S_ISLNK(st.st_mode):
            info = _info(name, 0o777)
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            info = _info(name, mode)
            info.size = st.st_size
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            raise ValueError(f"{path}: the Nix store holds only files, directories and symlinks")


def write_layer(out: BinaryIO, store_paths: Iterable[str] = (),
                entries: Iterable[Entry] = ()) -> LayerDigests:
    """Writes one gzip'd tar of `entries` then `store_paths` to `out` and returns its digests."""
    store_paths = sorted(store_paths)
    entries = list(entries)
    compressed = _HashingWriter(out)
    # igzip_threaded compresses each 1 MiB block on a thread of its own, without the GIL, and writes
    # (so hashes) the result there too: this thread only reads files and hashes the tar. Blocks are
    # cut at fixed offsets of the tar stream, so the same tar always gives the same bytes.
    gz = igzip_threaded.open(compressed, "wb", compresslevel=COMPRESSION_LEVEL, threads=1, block_size=CHUNK)
    try:
        sink = _TarSink(gz)
        _write_tar(sink, store_paths, entries)
    finally:
        gz.close()
    return LayerDigests(digest="sha256:" + compressed.hash.hexdigest(),
                        diff_id="sha256:" + sink.hash.hexdigest(), size=compressed.size)


def _write_tar(sink: _TarSink, store_paths: list[str], entries: list[Entry]) -> None:
    tar = tarfile.open(fileobj=sink, mode="w|", bufsize=CHUNK, format=tarfile.GNU_FORMAT,  # type: ignore[call-overload]
                       encoding="utf-8")
    tar.copybufsize = CHUNK
    names = [e.name for e in entries] + [p.lstrip("/") for p in store_paths]
    # Implied parent directories and explicit entries, in one name order: parents come first.
    synthetic = {parent: Entry(parent, "dir", 0o755) for parent in _parents(names)}
    synthetic.update((e.name, e) for e in entries)
    for entry in sorted(synthetic.values(), key=lambda e: e.name):
        info = _info(entry.name, entry.mode)
        info.uid, info.gid = entry.uid, entry.gid
        if entry.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif entry.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = entry.target
        elif entry.kind == "file":
            data = entry.content.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            continue
        else:
            raise ValueError(f"unknown entry kind {entry.kind}")
        tar.addfile(info)
    try:
        for store_path in store_paths:
            _add_store_path(tar, store_path)
    except BaseException:
        # The layer is abandoned (a full disk, say): the tar is closed now, into a sink that takes
        # nothing more, rather than finished when it is garbage-collected, which would fail again
        # outside any handler and print a bare traceback.
        sink.abandoned = True
        tar.close()
        raise
    tar.close()

