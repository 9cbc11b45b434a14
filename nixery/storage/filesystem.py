"""The filesystem backend: content-addressed files under STORAGE_PATH.

Every object is written under a temporary name in the same directory and
renamed into place, so a reader sees the whole object or nothing. The media
type lives in a small sidecar file written before the object is renamed, so
no extended attributes are needed and a visible object always has its type.

A temporary file is locked (`flock`) by its writer until it is published or
removed, and the kernel drops the lock when the writer dies, however it dies: a
temporary file of this machine that nobody holds was left by a killed worker or
instance, and the next start (or readiness check) removes it, whatever its age,
while the files of the instances still writing into a shared directory are left
alone. Another machine's files are only removed past an age no upload reaches,
since a lock taken there need not be seen here (NFS without its lock service).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from ..atomic import hold_lock, write_atomic
from ..locks import try_lock
from . import Backend, BlobInfo, Lease, LocalFile, StorageError, StoredObject, Upload, check_key

log = logging.getLogger(__name__)

_TYPE_SUFFIX = ".type"
_OS_ERRORS = {errno.ENOSPC: "storage full", errno.EDQUOT: "storage full (quota)",
              errno.EROFS: "storage read-only", errno.EACCES: "storage not writable (permission denied)",
              errno.EPERM: "storage not writable (permission denied)", errno.EIO: "storage I/O error"}
_TMP_DIR = "tmp"
# A temporary file is created, then locked: an empty one younger than this may be between the two.
_UNLOCKED_GRACE_SECONDS = 60
# The collection lease: a file locked by its holder (next to the objects, so that instances
# sharing the directory exclude each other too) and holding when the last collection finished.
_LEASE_FILE = "gc.lease"
# No manifest is larger: the type of a larger object is not read when storage is listed.
_SMALL_OBJECT = 4 << 20
# No upload takes this long: a file that cannot be known free by its lock is removed past this age.
_STALE_TMP_SECONDS = 24 * 3600


class _FileUpload(Upload):
    def __init__(self, backend: "FilesystemBackend", file: BinaryIO, tmp_path: Path):
        self.backend = backend
        self.file = file
        self.tmp_path = tmp_path
        self.committed = False

    def commit(self, key: str, media_type: str) -> None:
        with _storage_errors():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.backend._publish(self.tmp_path, key, media_type)
        self.committed = True


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """An OSError while writing (full, read-only) as the StorageError a client is told (503)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _OS_ERRORS:
            raise
        raise StorageError(describe_os_error(e)) from None


# This machine, in the names of its temporary files (its host name's hash: a name has no "-" then).
MACHINE = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def tmp_prefix(pid: int) -> str:
    """Temporary files are named by the writing machine and process, so that the master removes a
    dead worker's, and the next start a dead instance's."""
    return f"{pid}-{MACHINE}-"


def drop_if_abandoned(path: Path) -> bool:
    """Removes the temporary file at `path` if its writer is gone, and returns True if it did.

    A file of this machine is abandoned when nobody holds its lock (an empty one may be between
    its creation and its lock). Another machine's lock may not reach this one, and a file
    whose lock cannot be tried is not known to be free: such a file is only removed once older
    than any upload."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            known_free = path.name.split("-")[1:2] == [MACHINE]
        except BlockingIOError:
            return False
        except OSError:
            known_free = False
        held = os.fstat(fd)
        age = time.time() - held.st_mtime
        young = (held.st_size == 0 and age < _UNLOCKED_GRACE_SECONDS) if known_free else age < _STALE_TMP_SECONDS
        if young:
            return False
        if os.stat(path).st_ino != held.st_ino:  # published (renamed away) meanwhile, and replaced
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:  # published meanwhile
        return False
    finally:
        os.close(fd)


def drop_partial_uploads(root: Path, pid: int) -> None:
    """Removes what worker `pid` was writing when it died (called by the master when it sees it die)."""
    for path in (root.resolve() / _TMP_DIR).glob(f"{tmp_prefix(pid)}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class FilesystemBackend(Backend):
    name = "filesystem"

    def __init__(self, root: Path):
        self.root = root.resolve()
        try:
            for sub in ("layers", "builds", "manifests", _TMP_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self.root}: {e.strerror}") from None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def stat(self, key: str) -> Optional[BlobInfo]:
        path = self._path(key)
        try:
            size = path.stat().st_size
            media_type = Path(str(path) + _TYPE_SUFFIX).read_text()
        except FileNotFoundError:
            return None
        return BlobInfo(size=size, media_type=media_type)

    def read(self, key: str) -> Optional[bytes]:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _publish(self, tmp_path: Path, key: str, media_type: str) -> None:
        path = self._path(key)
        if path.exists():  # content-addressed: whoever published first wrote the same bytes
            os.unlink(tmp_path)
            return
        write_atomic(Path(str(path) + _TYPE_SUFFIX), media_type.encode(), self.root / _TMP_DIR,
                     tmp_prefix(os.getpid()))
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)

    def write(self, key: str, data: bytes, media_type: str) -> None:
        path = self._path(key)
        tmp_dir = self.root / _TMP_DIR
        with _storage_errors():
            write_atomic(Path(str(path) + _TYPE_SUFFIX), media_type.encode(), tmp_dir, tmp_prefix(os.getpid()))
            write_atomic(path, data, tmp_dir, tmp_prefix(os.getpid()))

    def put_if_absent(self, key: str, data: bytes, media_type: str) -> None:
        if not self._path(key).exists():  # its type sidecar was written before it
            self.write(key, data, media_type)

    @contextlib.contextmanager
    def upload(self) -> Iterator[Upload]:
        """A full or read-only disk found while the caller writes (or when the file is closed and its
        buffer flushed) is a StorageError; the partial file is removed whatever happens."""
        with _storage_errors():
            fd, tmp = tempfile.mkstemp(dir=self.root / _TMP_DIR, prefix=tmp_prefix(os.getpid()))
            hold_lock(fd)
        upload: Optional[_FileUpload] = None
        try:
            with _storage_errors(), os.fdopen(fd, "wb") as file:
                upload = _FileUpload(self, file, Path(tmp))
                yield upload
        finally:
            if upload is None or not upload.committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def check(self) -> None:
        """Removes what killed workers and instances left in tmp/ (the files whose writer is
        gone: other instances sharing the directory may be uploading), then writes and reads
        back a file: a read-only or full disk is found at start-up, not at a pull."""
        for path in (self.root / _TMP_DIR).iterdir():
            if drop_if_abandoned(path):
                log.info("removed a partial upload left by a dead process", extra={"path": str(path)})
        try:
            # Nameless (O_TMPFILE, or unlinked at once): nothing for a concurrent sweep to take.
            with tempfile.TemporaryFile(dir=self.root / _TMP_DIR) as probe:
                os.write(probe.fileno(), b"nixery")
                os.fsync(probe.fileno())
                if os.pread(probe.fileno(), 16, 0) != b"nixery":
                    raise StorageError(f"{self.root}: a file read back differs from what was written")
        except OSError as e:
            raise StorageError(f"{self.root}: {describe_os_error(e)}") from None

    def locate(self, key: str) -> Optional[LocalFile]:
        info = self.stat(key)
        return LocalFile(str(self._path(key)), info) if info else None

    def objects(self) -> Iterator[StoredObject]:
        for prefix in ("layers", "builds", "manifests"):
            with os.scandir(self.root / prefix) as entries:
                for entry in entries:
                    if entry.name.endswith(_TYPE_SUFFIX) or not entry.is_file(follow_symlinks=False):
                        continue
                    key = f"{prefix}/{entry.name}"
                    try:
                        st = entry.stat(follow_symlinks=False)
                        # Only a blob may be a manifest: records and pinned manifests are known by their prefix.
                        media_type = (Path(entry.path + _TYPE_SUFFIX).read_text()
                                      if prefix == "layers" and st.st_size <= _SMALL_OBJECT else None)
                    except FileNotFoundError:  # removed since the listing
                        continue
                    yield StoredObject(key, st.st_size, _used(st), str(st.st_ino), media_type)

    def unchanged(self, listed: StoredObject) -> bool:
        try:
            st = self._path(listed.key).stat()
        except FileNotFoundError:
            return False
        return _used(st) <= listed.used and str(st.st_ino) == listed.version

    def delete(self, listed: StoredObject) -> bool:
        """Looks at the file again just before removing it: one used or rewritten since the
        listing stays. A reader that opened it already reads on (an unlinked file lives until
        closed)."""
        path = self._path(listed.key)
        if not self.unchanged(listed):
            return not path.exists()
        for gone in (path, Path(str(path) + _TYPE_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                gone.unlink()
        return True

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot mark a blob used", extra={"key": key, "reason": describe_os_error(e)})

    @contextlib.contextmanager
    def lease(self, term: float) -> Iterator[Optional[Lease]]:
        fd = os.open(self.root / _LEASE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            yield _FileLease(fd) if try_lock(fd) else None
        finally:
            os.close(fd)


def _used(st: os.stat_result) -> float:
    """When a file was last used: written, or marked used by `touch`. Its modification time, not its
    access time, which reads move on (the collector's own reads of manifests included)."""
    return st.st_mtime


class _FileLease(Lease):
    """An OFD lock on the lease file: the kernel lets it go when its holder dies."""

    def __init__(self, fd: int):
        self.fd = fd
        raw = os.pread(fd, 4096, 0)
        try:
            self.previous = float(json.loads(raw)["finished"]) if raw else 0.0
        except (ValueError, KeyError, TypeError):
            self.previous = 0.0

    def renew(self) -> bool:
        return True  # held until the file is closed

    def finish(self, when: float) -> None:
        data = json.dumps({"finished": when}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def describe_os_error(e: OSError) -> str:
    """The reason a client or operator can act on: full, read-only, not permitted."""
    return _OS_ERRORS.get(e.errno, e.strerror or type(e).__name__)
