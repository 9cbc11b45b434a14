"""A public instance under hostile and heavy load (issue 10), the clients' side: slow and
malformed clients, ranges, clients that stop reading, graceful stops — each against a real
server (the figures are bench/load.py's; the builds' side is test_load_builds.py)."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest
import requests

from load_support import all_log_lines_are_json, raw_request, small_set, status_and_errors
from support import errors_of

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
    # The slow heads must outlive the test (up to 20 s of half-second waits below on a loaded
    # machine): with the default 10 s header timeout they were cut off before the cap was reached.
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_THREADS": "4",
                           "NIXERY_CLIENT_CONNECTIONS": "60", "NIXERY_HEADER_TIMEOUT": "60"})
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


def test_a_graceful_stop_finishes_builds_serves_their_clients_then_refuses_connections(start_server, pkgset,
                                                                                       tmp_path):
    """SIGTERM during a build: the build finishes and its client is answered; meanwhile the server
    answers what needs no build (the build's client asks for blobs next) but starts no build
    (503 with Retry-After); once nothing has been in flight for the keep-alive time (5 s), new
    connections are refused. An idle server refuses them at once."""
    packages = small_set(tmp_path / "set", pkgset, seconds=4)
    server = start_server({"NIXERY_PKGS_PATH": str(packages)})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        building = pool.submit(requests.get, f"{server.url}/v2/sleepy/manifests/latest", timeout=60)
        time.sleep(1.5)
        server.terminate()
        time.sleep(0.5)
        assert requests.get(f"{server.url}/v2/", timeout=5).status_code == 200
        refused = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "10", refused.text
        assert errors_of(refused)[0]["code"] == "UNAVAILABLE" and "stopping" in errors_of(refused)[0]["message"]
        response = building.result()
        answered = time.monotonic()
    assert response.status_code == 200 and response.json()["layers"]
    for layer in response.json()["layers"]:
        assert requests.get(f"{server.url}/v2/sleepy/blobs/{layer['digest']}", timeout=30).status_code == 200
    assert time.monotonic() - answered < 5, "the blobs were asked for within the keep-alive time"
    time.sleep(5 + 2)  # the keep-alive time without a request (and a turn of each worker's loop)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/", timeout=2)
    assert server.wait()
    entries = server.log_entries()
    waits = [e for e in entries if e.get("message") == "stopping: waiting for requests in flight"]
    assert waits and any("/v2/sleepy/manifests/latest" in r for w in waits for r in w["requests"])
    assert not [e for e in entries if e.get("message") == "build started" and e.get("image") == "hello"]
    all_log_lines_are_json(server)

    idle = start_server({"NIXERY_PKGS_PATH": str(packages)})
    assert requests.get(f"{idle.url}/v2/", timeout=5).status_code == 200
    time.sleep(1)  # that request over, connection closed and all
    idle.terminate()
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{idle.url}/v2/", timeout=2)
    assert idle.wait()


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
