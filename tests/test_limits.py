"""Per-client limits behind proxies, waiting without threads, and login lockouts across workers
(issue 20), each against a real server (`python -m nixery`, two Gunicorn workers)."""

from __future__ import annotations

import concurrent.futures
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from load_support import all_log_lines_are_json, git_source, session_from, small_set
from nixery import config
from nixery.clients import TrustedProxies, head_headers
from support import NIX_ENV, errors_of

PASSWORD = f"pw-{uuid.uuid4().hex}"
# Long builds run as root, not as Nix's build users: on a machine shared with other jobs whose Nix
# runs in private mount namespaces, a long build as nixbld1 is killed when another Nix takes that user.
LONG_BUILDS = {"NIX_CONFIG": NIX_ENV["NIX_CONFIG"] + "\nbuild-users-group =", "NIX_TIMEOUT": "120"}


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("htpasswd") / "htpasswd"
    subprocess.run(["htpasswd", "-bBc", str(path), "alice", PASSWORD], check=True, capture_output=True)
    return path


def wait_for_builds(server, count: int, timeout: float = 60) -> None:
    """Returns once `count` builds have started (each holds its slots), so that timing does not."""
    deadline = time.monotonic() + timeout
    while len([e for e in server.log_entries() if e.get("message") == "build started"]) < count:
        assert time.monotonic() < deadline, f"{count} builds did not start"
        time.sleep(0.1)


def password_checks(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^nixery_password_checks_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------------- trusted proxies --

def test_behind_a_trusted_proxy_each_client_has_its_own_build_slot_and_lockout(start_server, pkgset, tmp_path,
                                                                                htpasswd):
    """127.0.0.1 is the proxy: the three users it speaks for (X-Forwarded-For) each get a build slot
    (NIXERY_CLIENT_BUILDS=1) and a lockout of their own; 127.0.0.2 is not trusted, so what it says
    in the header counts for nothing."""
    packages = small_set(tmp_path / "set", pkgset, seconds=4)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_TRUSTED_PROXIES": "127.0.0.1,10.9.0.0/16",
                           "NIXERY_CLIENT_BUILDS": "1", "NIXERY_MAX_BUILDS": "8", "NIXERY_HTPASSWD": str(htpasswd),
                           "NIXERY_AUTH": "build", "NIXERY_ACCESS_LOG": "true", **LONG_BUILDS})
    url, alice = server.url, ("alice", PASSWORD)
    users = {"203.0.113.1": "sleepy", "203.0.113.2": "sleepy/hello", "203.0.113.3": "sleepier"}

    def pull(name: str, forwarded_for: str, source: str = "127.0.0.1", auth=alice) -> requests.Response:
        # What a proxy sends: the client's own claim (ignored) and, rightmost, the address it saw;
        # a second, trusted proxy (10.9.0.7) in front of the first.
        return session_from(source).get(f"{url}/v2/{name}/manifests/latest", auth=auth, timeout=60,
                                        headers={"X-Forwarded-For": f"6.6.6.6, {forwarded_for}, 10.9.0.7"})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        building = {user: pool.submit(pull, name, user) for user, name in users.items()}
        wait_for_builds(server, 3)
        for user in users:
            refused = pull("sleepier/hello", user)
            assert refused.status_code == 429 and errors_of(refused)[0]["code"] == "TOOMANYREQUESTS", user
        assert {user: f.result().status_code for user, f in building.items()} == dict.fromkeys(users, 200)
        # From an untrusted peer the header is ignored: two "users" are one address, with one slot.
        # (`failing` sleeps 4 s before it fails: the only slow derivation not built yet.)
        untrusted = pool.submit(pull, "failing", "198.51.100.1", "127.0.0.2")
        wait_for_builds(server, 4)
        refused = pull("hello/sleepier", "198.51.100.2", "127.0.0.2")
        assert refused.status_code == 429 and "already has 1 new builds" in errors_of(refused)[0]["message"]
        assert untrusted.result().status_code == 422

        # The first user guesses twenty times at once and is locked out; the others are not.
        guesses = list(pool.map(lambda _: pull("sleepy", "203.0.113.1", auth=("eve", "guess")), range(20)))
        assert {r.status_code for r in guesses} == {401}
    assert pull("sleepy", "203.0.113.1").status_code == 429, "locked out, even with the right password"
    assert pull("sleepy", "203.0.113.2").status_code == 200
    assert pull("sleepy", "203.0.113.3", auth=("mallory", "guess")).status_code == 401
    # The logs name each client, never the proxy.
    failed = [e for e in server.log_entries() if e.get("message") == "login failed"]
    assert {e["client"] for e in failed} == {"203.0.113.1", "203.0.113.3"}
    access = [e for e in server.log_entries() if e.get("logger") == "nixery.access"]
    clients = {e["client"] for e in access if e["path"].startswith("/v2/")}
    assert {*users, "127.0.0.2"} <= clients and not clients & {"6.6.6.6", "10.9.0.7", "198.51.100.1"}, clients
    built = {e["client"] for e in server.log_entries() if e.get("message") in ("image built", "image build failed")}
    assert built == {*users, "127.0.0.2"}, built
    all_log_lines_are_json(server)


def test_a_trusted_proxys_connections_count_for_its_clients(start_server, pkgset):
    """The connection cap counts a proxy's connections for the clients they carry, once their
    heads are read; the proxy itself is not capped."""
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_TRUSTED_PROXIES": "127.0.0.1",
                           "NIXERY_CLIENT_CONNECTIONS": "3", "NIXERY_WORKERS": "1"})
    held = []
    try:
        for _ in range(6):  # more than the cap from the proxy itself: each a head not yet complete
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        answers = []
        for i in range(6):  # the heads complete, three for one client, three for another
            held[i].sendall(f"X-Forwarded-For: 192.0.2.{i % 2}\r\n\r\n".encode())
            held[i].settimeout(5)
            answers.append(held[i].recv(4096).split(b"\r\n", 1)[0])
        assert answers == [b"HTTP/1.1 200 OK"] * 6
        # The six are kept alive: a fourth connection of client 192.0.2.0 is refused, not another's.
        extra = socket.create_connection(("127.0.0.1", server.port))
        held.append(extra)
        extra.settimeout(5)
        extra.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.0\r\n\r\n")
        assert extra.recv(4096).startswith(b"HTTP/1.1 429")
        other = socket.create_connection(("127.0.0.1", server.port))
        held.append(other)
        other.settimeout(5)
        other.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.9\r\n\r\n")
        assert other.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------- waiting, threadless --

def test_health_answers_while_every_thread_would_wait_for_a_build(start_server, pkgset, tmp_path):
    """NIXERY_THREADS=2 (four threads in all) and four clients waiting on a 20 s build."""
    packages = small_set(tmp_path / "set", pkgset, seconds=20)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_THREADS": "2", **LONG_BUILDS})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(lambda i: session_from(f"127.0.2.{i + 1}").get(
            f"{server.url}/v2/sleepy/manifests/latest", timeout=120), i) for i in range(4)]
        time.sleep(3)  # all four are waiting, one of them running the build
        took = []
        for path in ("/healthz", "/readyz", "/v2/", "/healthz"):
            started = time.monotonic()
            assert requests.get(server.url + path, timeout=20).status_code == 200, path
            took.append(time.monotonic() - started)
        assert max(took) < 1, took
        assert not any(f.done() for f in waiting), "the build was still running"
        responses = [f.result() for f in waiting]
    assert {r.status_code for r in responses} == {200} and len({r.content for r in responses}) == 1
    builds = [e for e in server.log_entries() if e.get("message") == "build started"]
    assert len(builds) == 1, "one build for the four"
    # The three that waited were answered from the build's memo; their logged durations count the wait.
    served = [e["duration"] for e in server.log_entries() if e.get("message") == "image served from cache"]
    assert len(served) == 3 and min(served) > 15, served
    all_log_lines_are_json(server)


def test_a_parked_client_that_hangs_up_is_let_go(start_server, pkgset, tmp_path):
    """NIXERY_CLIENT_CONNECTIONS=1 on one worker: once a waiting client hangs up, its address may
    connect again while the build still runs."""
    packages = small_set(tmp_path / "set", pkgset, seconds=8)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_WORKERS": "1", "NIXERY_CLIENT_CONNECTIONS": "1",
                           **LONG_BUILDS})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        building = pool.submit(lambda: session_from("127.0.5.1").get(f"{server.url}/v2/sleepy/manifests/latest",
                                                                    timeout=60))
        wait_for_builds(server, 1)
        waiter = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.5.2", 0))
        waiter.sendall(b"GET /v2/sleepy/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1)  # parked
        again = session_from("127.0.5.2").get(f"{server.url}/v2/", timeout=10)
        assert again.status_code == 429, "the parked connection counts for its address"
        waiter.close()
        time.sleep(0.5)
        assert session_from("127.0.5.2").get(f"{server.url}/v2/", timeout=10).status_code == 200
        assert not building.done(), "the build was still running"
        assert building.result().status_code == 200
    all_log_lines_are_json(server)


def test_requests_waiting_for_a_build_slot_hold_no_thread(start_server, pkgset, tmp_path):
    """NIXERY_MAX_BUILDS=1 and six new images asked for at once, more than the four threads: the
    five waiting for the build slot are parked too."""
    packages = small_set(tmp_path / "set", pkgset, seconds=6)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_THREADS": "2", "NIXERY_MAX_BUILDS": "1",
                           **LONG_BUILDS})
    names = ["sleepy", "sleepier", "failing", "sleepy/sleepier", "hello", "hello/sleepier"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        waiting = [pool.submit(lambda i: session_from(f"127.0.4.{i + 1}").get(
            f"{server.url}/v2/{names[i]}/manifests/latest", timeout=120), i) for i in range(len(names))]
        time.sleep(2)
        took = []
        for path in ("/healthz", "/readyz", "/healthz"):
            started = time.monotonic()
            assert requests.get(server.url + path, timeout=60).status_code == 200, path
            took.append(time.monotonic() - started)
        assert max(took) < 1, took
        assert sum(f.done() for f in waiting) <= 1, "the builds were still running"
        statuses = [f.result().status_code for f in waiting]
    assert statuses == [200, 200, 422, 200, 200, 200]
    started = [e["time"] for e in server.log_entries() if e.get("message") == "build started"]
    assert len(started) == len(names), "each image built once"


def test_cached_pulls_stay_fast_while_200_clients_wait_for_a_build(start_server, pkgset, tmp_path):
    """Default settings; 200 clients (each from an address of its own) wait on one 30 s build
    while one client pulls a cached image 50 times (manifest and every blob). The figures
    of this setting are bench/load.py's."""
    packages = small_set(tmp_path / "set", pkgset, seconds=30)
    server = start_server({"NIXERY_PKGS_REPO": git_source(packages, tmp_path / "packages.git"), **LONG_BUILDS})
    puller = session_from("127.0.0.100")

    def cached_pull() -> float:
        started = time.monotonic()
        document = puller.get(f"{server.url}/v2/hello/manifests/latest", timeout=60).json()
        for blob in [document["config"], *document["layers"]]:
            assert len(puller.get(f"{server.url}/v2/hello/blobs/{blob['digest']}", timeout=60).content) == blob["size"]
        return time.monotonic() - started

    cached_pull()  # built once: every pull after is cached
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        waiting = [pool.submit(lambda i: session_from(f"127.0.3.{i + 1}").get(
            f"{server.url}/v2/sleepy/manifests/latest", timeout=180), i) for i in range(200)]
        time.sleep(5)  # every client is waiting
        times = sorted(cached_pull() for _ in range(50))
        still_waiting = sum(not f.done() for f in waiting)
        responses = [f.result() for f in waiting]
    assert times[-1] < 1, f"p99 (the slowest of 50) {times[-1]:.2f} s, median {times[25]:.3f} s"
    assert still_waiting == 200, "the pulls were measured while all 200 waited"
    assert {r.status_code for r in responses} == {200} and len({r.content for r in responses}) == 1
    builds = [e for e in server.log_entries() if e.get("message") == "build started" and e.get("image") == "sleepy"]
    assert len(builds) == 1


# ------------------------------------------------------------------------------- lockouts --

def test_concurrent_wrong_passwords_get_at_most_the_limit_of_checks_across_workers(start_server, pkgset, htpasswd):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_HTPASSWD": str(htpasswd),
                           "NIXERY_CLIENT_CONNECTIONS": "1000"})
    url = f"{server.url}/v2/hello/manifests/latest"
    with concurrent.futures.ThreadPoolExecutor(120) as pool:
        answers = list(pool.map(lambda _: requests.get(url, auth=("alice", "wrong"), timeout=60), range(120)))
    statuses = [r.status_code for r in answers]
    checked = [e for e in server.log_entries() if e.get("message") == "login failed"]
    assert len(checked) <= 20, f"{len(checked)} passwords checked"
    assert password_checks(server.url) == len(checked) == statuses.count(401)
    assert statuses.count(429) == 120 - len(checked)
    # The user is locked from any address, the address for any user (until 60 s without an attempt).
    other = session_from("127.0.0.7").get(url, auth=("alice", PASSWORD), timeout=30)
    assert other.status_code == 429 and other.headers["Retry-After"].isdigit()
    assert requests.get(url, auth=("bob", "x"), timeout=30).status_code == 429
    assert password_checks(server.url) == len(checked)


# ---------------------------------------------------------------------------- in process --

@pytest.mark.parametrize("peer, x_forwarded_for, forwarded, client", [
    ("10.1.1.1", "1.1.1.1, 2.2.2.2", None, "2.2.2.2"),  # the client's own claim (1.1.1.1) is not believed
    ("10.1.1.1", "1.1.1.1, 2.2.2.2, 10.3.3.3", None, "2.2.2.2"),  # through two trusted proxies
    ("10.1.1.1", "10.2.2.2, 10.3.3.3", None, "10.2.2.2"),  # all trusted: the leftmost
    ("10.1.1.1", "1.1.1.1, not-an-address", None, "10.1.1.1"),  # the proxy wrote garbage: the proxy
    ("10.1.1.1", "", "for=1.2.3.4", "1.2.3.4"),
    ("10.1.1.1", None, 'for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"',
     "2001:db8:cafe::17"),
    ("10.1.1.1", None, 'For="198.51.100.17:8080", for=10.0.0.5', "198.51.100.17"),
    ("10.1.1.1", None, "for=_hidden, for=10.9.9.9", "10.9.9.9"),  # an obfuscated client: as far as we see
    ("10.1.1.1", None, "proto=https", "10.1.1.1"),
    ("203.0.113.9", "1.1.1.1", "for=1.1.1.1", "203.0.113.9"),  # not a trusted peer: headers ignored
    ("::ffff:10.1.1.1", "1.1.1.1", None, "1.1.1.1"),  # an IPv4 peer on an IPv6 socket
    ("192.0.2.1", "2001:db8::1", None, "2001:db8::1"),
])
def test_the_client_is_the_rightmost_address_not_trusted(peer, x_forwarded_for, forwarded, client):
    networks = config.load({"NIXERY_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1"}).server.trusted_proxies
    assert TrustedProxies(networks).client(peer, x_forwarded_for, forwarded) == client


def test_trusted_proxies_are_checked_at_start_and_read_from_a_raw_head():
    for bad in ("10.0.0.0/33", "nginx", "10.0.0.1/8/2"):
        with pytest.raises(config.ConfigError, match="NIXERY_TRUSTED_PROXIES"):
            config.load({"NIXERY_TRUSTED_PROXIES": f"127.0.0.1,{bad}"})
    assert config.load({}).server.trusted_proxies == ()
    head = (b"GET /v2/ HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nHost: x\r\nx-forwarded-for:2.2.2.2 \r\n\r\n"
            b"X-Forwarded-For: 3")  # a body, not a header
    assert head_headers(head, ("x-forwarded-for", "forwarded")) == {"x-forwarded-for": "1.1.1.1,2.2.2.2",
                                                                     "forwarded": None}
