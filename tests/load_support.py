"""Helpers of the load tests (tests/test_load.py, tests/test_load_builds.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import requests

from support import Server

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


def git_source(work: Path, directory: Path) -> str:
    """A bare git repository of the package set at `work` (so that built images are pinned and
    cached), as the file:// URL NIXERY_PKGS_REPO takes."""
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "packages"]):
        subprocess.run(["git", "-C", str(work), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                       check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(directory)], check=True, capture_output=True)
    return f"file://{directory}"


def session_from(address: str) -> requests.Session:
    """A requests session whose connections come from `address` (a loopback address of its own)."""
    session = requests.Session()
    session.get_adapter("http://").init_poolmanager(4, 4, source_address=(address, 0))
    return session
