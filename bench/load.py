#!/usr/bin/env python3
"""Cached pulls under hostile and heavy load (issue 10's figure).

Starts Nixery as users run it (2 workers, default threads and limits) on a git
package set (so that built images are pinned and cached), builds a small image
once, then measures ROUNDS x PULLS sequential cached pulls (manifest, then every
blob, one keep-alive client at 127.0.0.100), first on an idle server, then while:

- SLOW connections (from 127.0.0.2-.11) send their headers a byte a second,
  reopened when the server cuts them off (NIXERY_HEADER_TIMEOUT),
- WAITERS clients (each from an address of its own, 127.0.1.x and up) wait for one image whose
  build sleeps BUILD s (parked by the worker: they hold no thread),
- an image of about MB MB is being assembled (its store paths are built beforehand,
  so its request spends its time archiving and compressing layers).

and then /healthz and /readyz, PROBES times each, while the waiters still wait.
Everything stays on loopback; every loop is bounded in count and time.

    python3 bench/load.py [--pulls 100] [--slow 200] [--waiters 200] [--build 30] [--mb 300] [--probes 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from pkgset import make_package_set  # noqa: E402
from support import NIX_ENV, Server  # noqa: E402

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


class SourceAdapter(HTTPAdapter):
    """requests from a chosen loopback source address (each client role has its own)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAdapter(address))
    return session


def git_repo(root: Path, slow: int, mb: int) -> str:
    # A new salt: every store path is new, so the waited-for build really runs.
    work = make_package_set(root / "work", salt=uuid.uuid4().hex[:12], slow_seconds=slow, big_count=10,
                            big_mb=max(1, mb // 15))
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "packages"]):
        subprocess.run(["git", "-C", str(work), "-c", "user.name=bench", "-c", "user.email=bench@example.com",
                        *args], check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "packages.git")], check=True)
    # The big image's store paths exist before the run: its request is all assembly.
    subprocess.run(["nix-build", str(work), "-A", "big", "--no-out-link"], check=True, capture_output=True,
                   env={**os.environ, **NIX_ENV})
    return f"file://{root / 'packages.git'}"


def pull(session: requests.Session, url: str, image: str) -> float:
    """One cached pull: the manifest, then every blob (read whole). Returns its seconds."""
    started = time.monotonic()
    manifest = session.get(f"{url}/v2/{image}/manifests/latest", headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    manifest.raise_for_status()
    document = manifest.json()
    for blob in [document["config"], *document["layers"]]:
        response = session.get(f"{url}/v2/{image}/blobs/{blob['digest']}", timeout=30)
        response.raise_for_status()
        assert len(response.content) == blob["size"]
    return time.monotonic() - started


def pulls(url: str, count: int) -> list[float]:
    session = session_from("127.0.0.100")
    return [pull(session, url, "hello") for _ in range(count)]


def probe(url: str, path: str, count: int) -> list[float]:
    """`count` health probes, each on a new connection as a load balancer's, from 127.0.0.101."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        session_from("127.0.0.101").get(f"{url}{path}", timeout=60).raise_for_status()
        times.append(time.monotonic() - started)
    return times


def figures(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[max(0, int(round(0.99 * len(ordered))) - 1)]
    return (f"p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {ordered[-1] * 1000:.0f} ms, failures 0 of {len(ordered)}")


class SlowClients:
    """`count` connections that send a head a byte a second, reopened when the server closes them."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.count = count
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connect(self, i: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), source_address=(f"127.0.0.{2 + i % 10}", 0))
        s.setblocking(False)
        s.send(b"GET /v2/ HTTP/1.1\r\n")
        self.opened += 1
        return s

    def run(self) -> None:
        conns = [self.connect(i) for i in range(self.count)]
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            for i, s in enumerate(conns):
                try:
                    s.send(b"X")
                    try:
                        if s.recv(4096) == b"":
                            raise ConnectionError
                        raise ConnectionError  # answered (408): the server cut it off
                    except BlockingIOError:
                        pass
                except OSError:
                    s.close()
                    conns[i] = self.connect(i)
            self.stop.wait(1.0)
        for s in conns:
            s.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pulls", type=int, default=100)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--waiters", type=int, default=200)
    parser.add_argument("--build", type=int, default=30, help="seconds the waited-for build sleeps")
    parser.add_argument("--mb", type=int, default=300, help="size of the image being assembled")
    parser.add_argument("--probes", type=int, default=20, help="health probes while the waiters wait")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-bench-load-"))
    print(f"preparing a package set ({args.mb} MB image built beforehand) in {work} ...", flush=True)
    repo = git_repo(work, args.build, args.mb)
    # Builds run as root, not as Nix's build users: on a machine shared with other jobs whose Nix
    # runs in private mount namespaces (and so cannot see this one's build-user locks), a long
    # build as nixbld1 is killed when another Nix takes the same user.
    nix_config = NIX_ENV["NIX_CONFIG"] + "\nbuild-users-group ="
    server = Server(work / "server", {"NIXERY_PKGS_REPO": repo, "NIX_TIMEOUT": str(args.build * 4),
                                      "NIX_CONFIG": nix_config})
    (work / "server").mkdir()
    server.start(timeout=60)
    try:
        url = server.url
        pull(session_from("127.0.0.100"), url, "hello")  # built once; every pull after is cached
        idle = pulls(url, args.pulls)
        print(f"idle server:  {args.pulls} cached pulls of hello: {figures(idle)}", flush=True)

        slow = SlowClients(server.port, args.slow)
        slow.thread.start()
        big_times: dict[str, float] = {}

        def big() -> int:
            started = time.monotonic()
            status = session_from("127.0.0.50").get(f"{url}/v2/big/manifests/latest", timeout=600).status_code
            big_times["seconds"] = time.monotonic() - started
            return status

        def wait_for_build(i: int) -> tuple[int, float]:
            started = time.monotonic()
            address = f"127.0.{1 + i // 250}.{1 + i % 250}"
            response = session_from(address).get(f"{url}/v2/slowbuild/manifests/latest", timeout=args.build * 4 + 60)
            return response.status_code, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(args.waiters + 1) as pool:
            waiting = [pool.submit(wait_for_build, i) for i in range(args.waiters)]
            time.sleep(1)  # the slow clients are connected, the waiters waiting on the build
            assembling = pool.submit(big)
            time.sleep(0.2)  # the assembly's request has reached the server
            loaded_started = time.monotonic()
            session = session_from("127.0.0.100")
            loaded, during_assembly = [], 0
            for _ in range(args.pulls):
                loaded.append(pull(session, url, "hello"))
                during_assembly += not assembling.done()
            loaded_seconds = time.monotonic() - loaded_started
            still_waiting = sum(not f.done() for f in waiting)
            print(f"under load:   {args.pulls} cached pulls of hello: {figures(loaded)} "
                  f"(in {loaded_seconds:.1f} s; meanwhile {slow.opened} slow connections opened, "
                  f"{still_waiting} of {args.waiters} clients still waiting on the build at the end, "
                  f"{during_assembly} pulls finished while the {args.mb} MB image was assembling)", flush=True)
            for path in ("/healthz", "/readyz"):
                probes = probe(url, path, args.probes)
                print(f"under load:   {args.probes} probes of {path}: {figures(probes)} "
                      f"({sum(not f.done() for f in waiting)} clients still waiting)", flush=True)
            results = [f.result() for f in waiting]
            big_status = assembling.result()
        slow.stop.set()
        slow.thread.join(timeout=10)
        statuses = {status for status, _ in results}
        print(f"the {args.waiters} waiters: statuses {sorted(statuses)}, answered after "
              f"{min(t for _, t in results):.1f}-{max(t for _, t in results):.1f} s (build sleeps {args.build} s)")
        print(f"the {args.mb} MB image: status {big_status} after {big_times['seconds']:.1f} s")
        builds = [e for e in server.log_entries() if e.get("message") == "build step" and e.get("step") == "build"
                  and e.get("image") == "slowbuild"]
        print(f"Nix builds of the waited-for image: {len(builds)}")
        ratio = sorted(loaded)[-1] / max(sorted(idle)[-1], 1e-9)
        print(f"worst loaded pull against worst idle pull: {ratio:.1f}x")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
