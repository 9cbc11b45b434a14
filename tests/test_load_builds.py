"""A public instance under hostile and heavy load (issue 10), the builds' side: failing
builds and retry storms, unknown names, per-client and instance-wide build limits, full and
read-only storage, dying workers — each against a real server (two modules, so that the
parallel test run can give each a worker)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from load_support import all_log_lines_are_json, small_set
from support import NIX_ENV, Server, errors_of

def test_a_failing_build_runs_once_for_all_waiters_and_is_remembered(start_server, pkgset, nix_counter, tmp_path):
    packages = small_set(tmp_path / "set", pkgset, seconds=2)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "PATH": nix_counter.path()})
    nix_counter.reset()
    url = f"{server.url}/v2/failing/manifests/latest"

    def pull(_):
        started = time.monotonic()
        response = requests.get(url, timeout=120)
        return response, time.monotonic() - started

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(pull, range(20)))
    wall = time.monotonic() - started
    assert nix_counter.count("nix-store") == 1, "one Nix build for twenty pulls"
    bodies = {r.content for r, _ in results}
    assert len(bodies) == 1 and {r.status_code for r, _ in results} == {422}
    assert "failing on purpose" in errors_of(results[0][0])[0]["message"] or \
        "failing" in errors_of(results[0][0])[0]["message"]
    steps = [e for e in server.log_entries() if e.get("message") == "build step" and e.get("image") == "failing"]
    build_time = sum(e["duration"] for e in steps)
    assert wall <= build_time + 1 + 1, (wall, build_time)  # + the source's resolve and the first request's start
    nix_counter.reset()
    again = requests.get(url, timeout=30)
    assert again.content == results[0][0].content and nix_counter.count() == 0, "remembered: no Nix run"
    all_log_lines_are_json(server)


def test_too_many_new_builds_from_one_address_is_429(start_server, pkgset, tmp_path):
    packages = small_set(tmp_path / "set", pkgset, seconds=3)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_CLIENT_BUILDS": "1"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.get, f"{server.url}/v2/sleepy/manifests/latest", timeout=60)
        time.sleep(1)
        second = pool.submit(requests.get, f"{server.url}/v2/sleepier/manifests/latest", timeout=60)
        refused = second.result()
        assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
        assert errors_of(refused)[0]["code"] == "TOOMANYREQUESTS"
        assert first.result().status_code == 200


def namespaced_server(workdir: Path, env: dict[str, str], size_mb: int) -> Server:
    """A server whose storage is a tmpfs of `size_mb` in a mount namespace of its own."""
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    wrapper = (shutil.which("unshare"), "--mount", "--propagation", "private", shutil.which("bash"), "-c",
               f"mount -t tmpfs -o size={size_mb}m nixery-test {storage} && exec \"$@\"", "wrapper")
    return Server(workdir, env, wrapper)


def in_namespace(server: Server, command: str) -> None:
    subprocess.run(["nsenter", "-t", str(server.proc.pid), "-m", "bash", "-c", command], check=True, timeout=60)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_storage_faults_are_503_and_stored_images_are_served(tmp_path, pkgset, fault):
    packages = small_set(tmp_path / "set", pkgset, seconds=0, big_mb=8)
    server = namespaced_server(tmp_path / "server", {"NIXERY_PKGS_PATH": str(packages)}, size_mb=24).start()
    try:
        url = server.url
        stored = requests.get(f"{url}/v2/hello/manifests/latest", timeout=120)
        assert stored.status_code == 200
        storage = server.workdir / "storage"
        if fault == "read-only":
            in_namespace(server, f"mount -o remount,ro {storage}")
        else:
            in_namespace(server, f"dd if=/dev/zero of={storage}/filler bs=1M count=100 2>/dev/null || true")
        published = subprocess.run(["nsenter", "-t", str(server.proc.pid), "-m", "ls", f"{storage}/layers"],
                                   capture_output=True, text=True, check=True).stdout.split()
        new = requests.get(f"{url}/v2/big/manifests/latest", timeout=120)
        assert new.status_code == 503
        [error] = errors_of(new)
        assert error["code"] == "UNAVAILABLE" and f"storage {fault}" in error["message"]
        again = requests.get(f"{url}/v2/hello/manifests/latest", timeout=120)
        assert again.status_code == 200 and again.content == stored.content
        for layer in [again.json()["config"], *again.json()["layers"]]:
            blob = requests.get(f"{url}/v2/hello/blobs/{layer['digest']}", timeout=30)
            assert blob.status_code == 200 and len(blob.content) == layer["size"]
        listing = subprocess.run(["nsenter", "-t", str(server.proc.pid), "-m", "bash", "-c",
                                  f"ls {storage}/layers; echo ---; ls {storage}/tmp"],
                                 capture_output=True, text=True, check=True).stdout
        layers_now, tmp_now = listing.split("---")
        assert layers_now.split() == published, "no blob of the failed image was published"
        assert tmp_now.split() == [], "no partial upload was left"
        all_log_lines_are_json(server)
    finally:
        server.stop()


def test_a_dead_workers_partial_upload_is_removed_at_once(start_server, pkgset, tmp_path):
    packages = small_set(tmp_path / "set", pkgset, seconds=0, big_mb=300)
    # The big path is built as root (no build user): on a shared machine, another Nix in a private
    # mount namespace can take the same build user and kill a long build running as it.
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIX_TIMEOUT": "300",
                           "NIX_CONFIG": NIX_ENV["NIX_CONFIG"] + "\nbuild-users-group ="})
    tmp = server.workdir / "storage" / "tmp"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, f"{server.url}/v2/big/manifests/latest", timeout=300)
        deadline = time.monotonic() + 240
        partial = []
        while not partial and not pending.done() and time.monotonic() < deadline:
            partial = [p for p in tmp.iterdir() if p.stat().st_size > 1_000_000]
            time.sleep(0.02)
        assert partial, f"the upload never started: {pending.result().text if pending.done() else 'timed out'}"
        pid = int(partial[0].name.split("-")[0])
        os.kill(pid, signal.SIGKILL)
        gone_by = time.monotonic() + 3
        while any(p.exists() for p in partial) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not any(p.exists() for p in partial), "the master removed the dead worker's partial upload"
        with pytest.raises(requests.ConnectionError):
            pending.result()


def test_builds_are_bounded_across_workers(start_server, pkgset, tmp_path):
    """NIXERY_MAX_BUILDS=1: two images asked for at once by two addresses are built one after the other."""
    packages = small_set(tmp_path / "set", pkgset, seconds=3)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_MAX_BUILDS": "1"})

    def get(name: str, address: str) -> float:
        session = requests.Session()
        session.get_adapter("http://").init_poolmanager(1, 1, source_address=(address, 0))
        response = session.get(f"{server.url}/v2/{name}/manifests/latest", timeout=60)
        assert response.status_code == 200, response.text
        return time.monotonic()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = sorted(pool.map(get, ["sleepy", "sleepier"], ["127.0.0.3", "127.0.0.4"]))
    assert done[1] - started >= 6, "the second build waited for the first one's slot"
