#!/usr/bin/env python3
"""What a login costs per request: an open instance against one behind htpasswd, side by side.

A pull makes a request per layer, and every one carries the password; a
bcrypt check is slow by design (cost 12, a common choice, takes a good part
of a second). Nixery checks once per worker and remembers a login that passed.
This starts two real Nixery servers (Gunicorn, one worker) on the same
storage, one open and one with an htpasswd file of the given cost, and times
the same blob HEAD requests against both over one keep-alive connection, then
prints the medians, their ratio, and what one bcrypt check costs (what every
request would pay without the remembered logins).

    python3 bench/auth.py [--cost 12] [--requests 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import Server  # noqa: E402
from pkgset import make_package_set  # noqa: E402


def timed_heads(session: requests.Session, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.head(url, timeout=30)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.status_code
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", type=int, default=12, help="bcrypt cost of the htpasswd entry")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pkgset = make_package_set(root / "pkgset")
        password = "bench-password"
        htpasswd = root / "htpasswd"
        subprocess.run(["htpasswd", "-cbB", "-C", str(args.cost), str(htpasswd), "bench", password],
                       check=True, capture_output=True)
        common = {"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_WORKERS": "1", "STORAGE_PATH": str(root / "storage")}
        open_server = Server(root / "open", common)
        private = Server(root / "private", {**common, "NIXERY_HTPASSWD": str(htpasswd)})
        for server in (open_server, private):
            server.workdir.mkdir()
            server.start()
        try:
            manifest = requests.get(f"{open_server.url}/v2/hello/manifests/latest", timeout=120).json()
            path = f"/v2/hello/blobs/{manifest['layers'][0]['digest']}"
            anonymous, logged_in = requests.Session(), requests.Session()
            logged_in.auth = ("bench", password)
            started = time.perf_counter()
            assert logged_in.head(private.url + path, timeout=30).status_code == 200
            first = time.perf_counter() - started
            rounds: dict[str, list[float]] = {"open": [], "login": []}
            for _ in range(4):  # interleaved, so that machine load falls on both alike
                rounds["open"] += timed_heads(anonymous, open_server.url + path, args.requests // 4)
                rounds["login"] += timed_heads(logged_in, private.url + path, args.requests // 4)
        finally:
            for server in (open_server, private):
                server.stop()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=args.cost))
    checks = []
    for _ in range(5):
        started = time.perf_counter()
        bcrypt.checkpw(password.encode(), hashed)
        checks.append(time.perf_counter() - started)
    open_ms = statistics.median(rounds["open"]) * 1000
    login_ms = statistics.median(rounds["login"]) * 1000
    check_ms = statistics.median(checks) * 1000
    print(f"blob HEAD, median of {len(rounds['open'])} each over one connection:")
    print(f"  open instance          {open_ms:8.2f} ms")
    print(f"  htpasswd, cost {args.cost:<2}      {login_ms:8.2f} ms  ({login_ms / open_ms:.2f}x open)")
    print(f"  first request (checks) {first * 1000:8.2f} ms")
    print(f"one bcrypt check at cost {args.cost}: {check_ms:.1f} ms "
          f"({check_ms / login_ms:.0f}x a remembered login's request)")


if __name__ == "__main__":
    main()
