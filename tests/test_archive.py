"""Layer archives: byte-for-byte determinism and digests that match the bytes."""

import gzip
import hashlib
import io
import os
import tarfile

import pytest

from nixery.archive import Entry, write_layer


@pytest.fixture
def tree(tmp_path):
    """A store-like tree: nested directories, an executable, a symlink, an empty file."""
    root = tmp_path / "nix/store/aaaa-pkg"
    (root / "bin").mkdir(parents=True)
    (root / "share/doc").mkdir(parents=True)
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin/tool").chmod(0o555)
    (root / "share/doc/README").write_bytes(os.urandom(300_000))
    (root / "share/empty").write_bytes(b"")
    (root / "bin/alias").symlink_to("tool")
    return root


def archive(paths, entries=()):
    out = io.BytesIO()
    digests = write_layer(out, store_paths=paths, entries=entries)
    return out.getvalue(), digests


def test_same_input_same_bytes(tree, tmp_path):
    data1, d1 = archive([str(tree)])
    os.utime(tree / "bin/tool", (12345, 12345))  # mtimes must not leak into the archive
    data2, d2 = archive([str(tree)])
    assert data1 == data2 and d1 == d2


def test_digests_match_the_bytes(tree):
    data, digests = archive([str(tree)], [Entry("tmp", "dir", 0o1777)])
    assert digests.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert digests.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert digests.size == len(data)


def test_entries_are_normalised(tree):
    data, _ = archive([str(tree)], [Entry("tmp", "dir", 0o1777), Entry("bin", "dir"),
                                    Entry("bin/tool", "symlink", target=str(tree / "bin/tool"))])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    prefix = str(tree).lstrip("/")
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" and m.mtime == 1 for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["tmp"].mode == 0o1777 and by_name["tmp"].isdir()
    assert by_name[f"{prefix}/bin/alias"].issym() and by_name[f"{prefix}/bin/alias"].linkname == "tool"
    assert by_name[f"{prefix}/bin/tool"].mode == 0o555
    # Every directory comes before what it holds, so unpackers never invent one.
    for i, name in enumerate(names):
        parent = name.rsplit("/", 1)[0]
        if "/" in name:
            assert parent in names[:i]


def test_memory_stays_bounded_for_big_files(tmp_path):
    import tracemalloc
    big = tmp_path / "nix/store/bbbb-big"
    big.mkdir(parents=True)
    with open(big / "data", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))

    class Sink:
        size = 0

        def write(self, data):
            self.size += len(data)

    tracemalloc.start()
    digests = write_layer(Sink(), store_paths=[str(big)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert digests.size > 64 << 20
    assert peak < 16 << 20, f"peak {peak} bytes for a 64 MiB layer"


def test_layers_archived_at_once_on_several_threads_are_byte_identical(tree, tmp_path):
    """Builds archive an image's layers in parallel: the bytes must not depend on the scheduling."""
    import concurrent.futures
    big = tmp_path / "nix/store/cccc-big"
    big.mkdir(parents=True)
    (big / "data").write_bytes(os.urandom(3 << 20) + b"text " * (1 << 20))
    paths = [str(tree), str(big)]
    expected = archive(paths)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: archive(paths), range(8)))
    assert all(result == expected for result in results)
    data, digests = expected
    assert digests.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()


class _FullDisk(io.RawIOBase):
    """An output that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return len(data)


def test_a_layer_given_up_on_fails_once_and_leaves_nothing_to_finish(tree, monkeypatch):
    """A full disk fails the layer with its OSError; the abandoned tar stream does not try to finish
    itself later (when it is garbage-collected), which would fail again and print a bare traceback."""
    import gc
    import sys
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    big = tree / "big"
    big.write_bytes(os.urandom(4 << 20))  # incompressible: the compressor must write while the tar is written
    with pytest.raises(OSError) as raised:
        write_layer(_FullDisk(1 << 20), [str(tree)])
    assert raised.value.errno == 28
    del raised
    gc.collect()
    assert unraisable == []
