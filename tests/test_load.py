"""A public instance under hostile and heavy load (issue 10): slow and malformed clients,
failing builds and retry storms, unknown names, full and read-only storage, dying workers
and graceful stops — each against a real server (the figures are bench/load.py's)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from support import NIX_ENV, Server, errors_of

_FAILING_SET = r'''
{ system ? builtins.currentSystem, ... }:
let
  bbdir = builtins.path { path = ./busybox-static; name = "busybox-static"; };
  mk = name: script: derivation {
    inherit name system;
    salt = "@SALT@";
    builder = "${bbdir}/bin/busybox";
    args = [ "sh" "-e" "-c" script ];
    PATH = "${bbdir}/bin";
  };
in {
  failing = mk "failing" "sleep @SECONDS@; echo 'failing on purpose' >&2; exit 3";
  sleepy = mk "sleepy" "sleep @SECONDS@; mkdir -p $out/bin; echo sleepy > $out/bin/sleepy";
  sleepier = mk "sleepier" "sleep @SECONDS@; mkdir -p $out/bin; echo sleepier > $out/bin/sleepier";
  hello = mk "hello" "mkdir -p $out/bin; echo hello-@SALT@ > $out/bin/hello";
  big = mk "big" "mkdir -p $out; dd if=/dev/urandom of=$out/blob bs=65536 count=$(( @BIG_MB@ * 16 ))";
}
'''


def small_set(directory: Path, pkgset: Path, seconds: int = 2, big_mb: int = 8) -> Path:
    """A package set of a failing, two slow, a small and a big package, all new store paths."""
    directory.mkdir(parents=True)
    shutil.copytree(pkgset / "busybox-static", directory / "busybox-static", symlinks=True)
    (directory / "default.nix").write_text(_FAILING_SET.replace("@SALT@", uuid.uuid4().hex[:12])
                                           .replace("@SECONDS@", str(seconds)).replace("@BIG_MB@", str(big_mb)))
    return directory


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_errors(response: bytes) -> tuple[int, list[dict]]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split(b" ")[1]), json.loads(body)["errors"]


def all_log_lines_are_json(server: Server) -> None:
    for line in server.log().splitlines():
        if line.strip():
            json.loads(line)  # raises on a line that is not JSON (a bare traceback, an HTML page)


def test_parser_errors_and_slow_heads_get_registry_json(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_HEADER_TIMEOUT": "2"})
    port = server.port
    cases = {
        414: b"GET /v2/" + b"a" * 9000 + b"/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
        431: b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        400: b"NOT A REQUEST LINE\r\n\r\n",
    }
    for status, data in cases.items():
        got, errors = status_and_errors(raw_request(port, data))
        assert got == status and errors[0]["message"], (status, errors)
    # A head that never completes is cut off after NIXERY_HEADER_TIMEOUT with a 408.
    started = time.monotonic()
    got, errors = status_and_errors(raw_request(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"))
    assert got == 408 and errors[0]["code"] == "REQUEST_TIMEOUT"
    assert 1.5 < time.monotonic() - started < 5
    all_log_lines_are_json(server)


def test_ranges_follow_rfc_9110_on_a_real_server(shared_server):
    url = shared_server.url
    manifest = requests.get(f"{url}/v2/hello/manifests/latest", timeout=120).json()
    layer = manifest["layers"][0]
    blob = f"{url}/v2/hello/blobs/{layer['digest']}"
    for header in ("items=0-9", "bytes=5-3", "bytes=0-1,4-5"):
        response = requests.get(blob, headers={"Range": header}, timeout=30)
        assert response.status_code == 200 and len(response.content) == layer["size"], header
    response = requests.get(blob, headers={"Range": f"bytes={layer['size']}-"}, timeout=30)
    assert response.status_code == 416 and errors_of(response)[0]["code"] == "RANGE_INVALID"


def test_slow_clients_take_no_capacity_and_one_address_is_capped(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_THREADS": "4",
                           "NIXERY_CLIENT_CONNECTIONS": "60"})
    slow = []
    try:
        # 100 connections from another loopback address each send part of a head: more than
        # all the threads (2 workers x 4), fewer than the per-address cap of both workers.
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0))
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for _ in range(20):
            started = time.monotonic()
            assert requests.get(f"{server.url}/v2/", timeout=5).status_code == 200
            assert time.monotonic() - started < 1
        # Past the cap, the address is told so (whichever worker takes the connection).
        refused = 0
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0))
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
            except TimeoutError:
                data = b""
            if data:
                assert data.startswith(b"HTTP/1.1 429") and b"TOOMANYREQUESTS" in data
                refused += 1
            slow.append(s)
        assert refused > 0
    finally:
        for s in slow:
            s.close()


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


def state_files(state: Path) -> int:
    """Files under the state directory, less prometheus_client's (one set per worker process,
    made at a worker's first request whichever name it is for)."""
    return sum(len(files) for root, _, files in os.walk(state) if "prometheus" not in Path(root).parts)


def test_unknown_names_cost_one_evaluation_and_no_state(start_server, pkgset, nix_counter):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "PATH": nix_counter.path(),
                           "NIXERY_CLIENT_BUILDS": "16", "NIXERY_FAILURE_TTL": "600"})
    state = server.workdir / "state"
    session = requests.Session()
    assert session.get(f"{server.url}/v2/nosuchwarmup/manifests/latest", timeout=60).status_code == 404
    assert session.get(f"{server.url}/v2/broken/manifests/latest", timeout=60).status_code == 422
    before = state_files(state)
    nix_counter.reset()

    def ask(i: int) -> int:
        return requests.get(f"{server.url}/v2/hello/nosuchname{i}/manifests/latest", timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(ask, range(1000)))
    assert set(statuses) == {404}
    after = state_files(state)
    assert after == before, "a requested name leaves no file behind"
    evaluations = nix_counter.count("nix-instantiate")
    assert evaluations == 1000
    nix_counter.reset()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(100))) == {404}
    assert nix_counter.count() == 0, "a repeated unknown name is answered from memory"
    # The real failure before the storm is still on the errors list.
    errors = requests.get(f"{server.url}/builds.json", timeout=30).json()["errors"]
    assert "broken" in [e["image"] for e in errors if e["outcome"] == "failed"]


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


def test_a_graceful_stop_refuses_new_connections_and_finishes_builds(start_server, pkgset, tmp_path):
    packages = small_set(tmp_path / "set", pkgset, seconds=4)
    server = start_server({"NIXERY_PKGS_PATH": str(packages)})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        building = pool.submit(requests.get, f"{server.url}/v2/sleepy/manifests/latest", timeout=60)
        time.sleep(1.5)
        server.terminate()
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/v2/", timeout=2)
        response = building.result()
    assert response.status_code == 200 and response.json()["layers"]
    assert server.wait()
    waits = [e for e in server.log_entries() if e.get("message") == "stopping: waiting for requests in flight"]
    assert waits and any("/v2/sleepy/manifests/latest" in r for w in waits for r in w["requests"])
    all_log_lines_are_json(server)


def test_builds_are_bounded_across_workers(start_server, pkgset, tmp_path):
    """NIXERY_MAX_BUILDS=1: two images asked for at once by two addresses are built one after the other."""
    packages = small_set(tmp_path / "set", pkgset, seconds=3)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_MAX_BUILDS": "1"})

    def get(name: str, address: str) -> float:
        session = requests.Session()
        session.get_adapter("http://").init_poolmanager(1, 1, source_address=(address, 0))
        assert session.get(f"{server.url}/v2/{name}/manifests/latest", timeout=60).status_code == 200
        return time.monotonic()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = sorted(pool.map(get, ["sleepy", "sleepier"], ["127.0.0.3", "127.0.0.4"]))
    assert done[1] - started >= 6, "the second build waited for the first one's slot"


def test_a_client_that_stops_reading_loses_its_thread(start_server, pkgset, tmp_path):
    packages = small_set(tmp_path / "set", pkgset, seconds=0, big_mb=32)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_WORKERS": "1", "NIXERY_THREADS": "2",
                           "NIXERY_IO_TIMEOUT": "2"})
    document = requests.get(f"{server.url}/v2/big/manifests/latest", timeout=120).json()
    layer = max(document["layers"], key=lambda blob: blob["size"])
    stalled = []
    try:
        for _ in range(4):  # more than the worker's threads; none of them reads
            s = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.5", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /v2/big/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            stalled.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        assert requests.get(f"{server.url}/v2/", timeout=20).status_code == 200
        assert time.monotonic() - started < 2 * 2 + 2, "threads came back after NIXERY_IO_TIMEOUT"
    finally:
        for s in stalled:
            s.close()
    all_log_lines_are_json(server)
