"""Crashes leave nothing behind: kill -9 of the master and its workers mid-upload, of a worker
mid-build, of the master while a worker is busy."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from load_support import small_set
from nixery.nix.processes import start_time, stop_recorded
from support import Server


def children_of(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def workers_of(server: Server) -> list[int]:
    return children_of(server.proc.pid)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def builders_of(salt: str) -> list[int]:
    """Live processes whose environment holds the package set's salt (a derivation's attributes
    are its builder's environment): the builders of that set's packages."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"salt={salt}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if alive(pid)]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_kill_9_of_master_and_workers_mid_upload_leaves_no_partial_file(tmp_path, pkgset):
    packages = small_set(tmp_path / "set", pkgset, seconds=0, big_mb=300)
    env = {"NIXERY_PKGS_PATH": str(packages), "NIXERY_WORKERS": "2"}
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", env).start()
    tmp = server.workdir / "storage" / "tmp"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(requests.get, f"{server.url}/v2/big/manifests/latest", timeout=300)
        # The 300 MB layer is being written when its partial file passes 10 MB.
        wait_for(lambda: any(f.stat().st_size > 10 << 20 for f in tmp.iterdir()), 240, "no layer was written")
        for pid in [server.proc.pid, *workers_of(server)]:
            os.kill(pid, signal.SIGKILL)
        server.proc.wait()
    partial = [f for f in tmp.iterdir() if f.stat().st_size > 0]
    assert partial, "the killed upload left its partial file (what the next start must remove)"
    again = Server(tmp_path / "server", env).start()
    try:
        assert list(tmp.iterdir()) == [], "the next start removed the partial upload"
    finally:
        again.stop()


def test_kill_9_of_a_worker_mid_build_stops_its_nix_and_drops_its_roots(tmp_path, pkgset):
    packages = small_set(tmp_path / "set", pkgset, seconds=10)
    salt = (packages / "default.nix").read_text().split('salt = "', 1)[1].split('"', 1)[0]
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", {"NIXERY_PKGS_PATH": str(packages), "NIXERY_WORKERS": "2",
                                          "NIXERY_GRACE_PERIOD": "10"}).start()
    roots = server.workdir / "state" / "gcroots"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(requests.get, f"{server.url}/v2/sleepy/manifests/latest", timeout=60)
            wait_for(lambda: builders_of(salt), 60, "the build did not start")
            # The worker building it is the one with a build's roots (named "<pid>-<hex>", beside
            # the stored images' roots under images/); its child processes are Nix's
            # (nix-store --realise, in a session of its own).
            [worker] = {int(p.name.split("-")[0]) for p in roots.iterdir() if p.is_dir() and p.name[0].isdigit()}
            nix = children_of(worker)
            assert nix and all(alive(pid) for pid in nix)
            os.kill(worker, signal.SIGKILL)
            # Within the grace period: no Nix process of the dead worker remains, nor any root of its.
            wait_for(lambda: not any(alive(pid) for pid in nix) and not builders_of(salt), 5,
                     "the dead worker's Nix processes still run")
            wait_for(lambda: not [p for p in roots.iterdir() if p.name.startswith(f"{worker}-")], 10,
                     "the dead worker's roots are still there")
            # And they stay gone: the build would have finished and re-created them by now.
            time.sleep(10)
            assert [p for p in roots.iterdir() if p.name.startswith(f"{worker}-")] == []
    finally:
        server.stop()


def test_when_the_master_dies_a_busy_worker_stops_listening_at_once(tmp_path, pkgset):
    packages = small_set(tmp_path / "set", pkgset, seconds=20)
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", {"NIXERY_PKGS_PATH": str(packages), "NIXERY_WORKERS": "1",
                                          "NIXERY_GRACE_PERIOD": "30"}).start()
    [worker] = workers_of(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(requests.get, f"{server.url}/v2/sleepier/manifests/latest", timeout=60)
        time.sleep(2)  # the worker is busy with the build
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        time.sleep(1)
        assert Path(f"/proc/{worker}").exists(), "the busy worker finishes its request"
        with socket.socket() as client:
            error = client.connect_ex(("127.0.0.1", server.port))
        assert error == errno.ECONNREFUSED, "the orphaned worker stopped listening: a new connection is refused"
        os.kill(worker, signal.SIGKILL)
        stop_recorded(server.workdir / "state" / "gcroots")  # as the next start would: no build left running


def test_a_recorded_pid_given_to_another_process_is_not_signalled(tmp_path):
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # The record of a Nix process that had this pid before (another start time).
        record = tmp_path / f"12345-nix-{other.pid}-{start_time(other.pid) - 1}"
        record.touch()
        stop_recorded(tmp_path, 12345)
        assert other.poll() is None and not record.exists()
    finally:
        other.kill()
        other.wait()



def _upload_hanging_at_fsync(root: str, passing: int) -> None:
    """A worker's upload whose fsyncs pass `passing` times and then hang, for it to be killed there:
    the first is the blob's, the second its media type's (the last step of an upload)."""
    from nixery.storage.filesystem import FilesystemBackend
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > passing:
            time.sleep(3600)
        real_fsync(fd)
    os.fsync = fsync
    with FilesystemBackend(Path(root)).upload() as upload:
        upload.file.write(b"layer")
        upload.commit("layers/sha256:" + "a" * 64, "application/octet-stream")


def test_a_worker_killed_while_publishing_leaves_nothing_the_master_does_not_remove(tmp_path):
    """Each temporary file of an upload, the blob's and its media type's, is named by its writer, so
    that the master removes each when the worker dies (and not only a day later)."""
    import multiprocessing

    from nixery.storage.filesystem import FilesystemBackend, drop_partial_uploads

    storage = FilesystemBackend(tmp_path / "storage")
    tmp = storage.root / "tmp"
    for passing, step in enumerate(("the blob", "its media type")):
        worker = multiprocessing.get_context("fork").Process(target=_upload_hanging_at_fsync,
                                                            args=(str(storage.root), passing))
        worker.start()
        wait_for(lambda: len(list(tmp.iterdir())) == passing + 1, 30, f"writing {step}")
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        drop_partial_uploads(storage.root, worker.pid)
        assert list(tmp.iterdir()) == [], f"killed while writing {step}, the worker left files behind"
