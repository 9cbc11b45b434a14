"""What users see in their client: reasons skopeo prints, nixpkgs' own reasons, suggestions,
progress of a long build, and an instance's log (access log, TLS probes).

Every failure here is pulled with skopeo, as a user would, and must fail with the
reason in its stderr: registry clients print the message of a 4xx answer only.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pkgset import make_package_set
from support import skopeo_pull


def pull_fails(server, name: str, tmp_path) -> str:
    """skopeo's stderr for a pull that must fail."""
    result = skopeo_pull(server.host, name, tmp_path / f"oci-{name.replace('/', '-')}")
    assert result.returncode != 0, f"{name} was pulled"
    assert "unexpected HTTP status" not in result.stderr, result.stderr
    return result.stderr


def error_of(server, name: str) -> tuple[int, dict]:
    response = requests.get(f"{server.url}/v2/{name}/manifests/latest", timeout=120)
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    (error,) = response.json()["errors"]
    assert "\n" not in error["message"]
    return response.status_code, error


@pytest.fixture
def server(start_server, pkgset, nix_counter, tmp_path):
    """The test set, served with NIXPKGS_ALLOW_UNFREE=1 in the service's environment and a
    ~/.config/nixpkgs/config.nix that allows everything: nixpkgs would read both, Nixery must not
    let them change what it serves."""
    home = tmp_path / "home"
    (home / ".config" / "nixpkgs").mkdir(parents=True)
    (home / ".config" / "nixpkgs" / "config.nix").write_text(
        "{ allowUnfree = true; allowBroken = true; allowUnsupportedSystem = true; }\n")
    started = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXPKGS_ALLOW_UNFREE": "1",
                            "NIXPKGS_ALLOW_BROKEN": "1", "HOME": str(home), "PATH": nix_counter.path()})
    nix_counter.reset()
    return started


def test_repeatable_failures_reach_skopeo_with_their_reason(server, nix_counter, tmp_path):
    # A package whose build fails: 422, naming the package and Nix's reason.
    status, error = error_of(server, "broken")
    assert status == 422 and error["message"].startswith("broken failed to build: builder for '/nix/store/")
    assert "failed with exit code 3" in pull_fails(server, "broken", tmp_path)

    # nixpkgs' own reasons, each as such: the alias's message, unfree (and how to allow it), broken,
    # insecure, unsupported; the service's NIXPKGS_ALLOW_* variables change nothing.
    removed = "'youtube-dl' has been removed from nixpkgs, as it is unmaintained; use yt-dlp"
    assert error_of(server, "youtube-dl") == (404, {
        "code": "MANIFEST_UNKNOWN", "message": f"youtube-dl: {removed}",
        "detail": {"packages": [{"name": "youtube-dl", "reason": "removed", "detail": removed}]}})
    assert removed in pull_fails(server, "youtube-dl", tmp_path)
    assert "renamed to/replaced by 'hello'" in error_of(server, "oldhello")[1]["message"]

    status, error = error_of(server, "unfreetool")
    assert (status, error["code"]) == (403, "DENIED")
    assert "unfreetool has an unfree license (unfree)" in error["message"]
    assert "NIXERY_ALLOW_UNFREE=true" in pull_fails(server, "unfreetool", tmp_path)
    assert error_of(server, "brokentool")[1]["message"] == "brokentool is marked as broken in the package set"
    assert error_of(server, "insecuretool")[1]["message"] == \
        "insecuretool is marked as insecure in the package set (known issues: CVE-2099-0001)"
    assert error_of(server, "armonly") == (404, {
        "code": "MANIFEST_UNKNOWN", "message": "armonly is not available on x86_64-linux in the package set",
        "detail": {"packages": [{"name": "armonly", "reason": "unsupported", "detail": "x86_64-linux"}]}})
    status, error = error_of(server, "python3packages")
    assert (status, error["message"]) == (404, "python3packages is not a package but a set of packages: "
                                               "name one of its packages, python3packages.NAME")
    assert error_of(server, "writescript")[1]["message"] == "writescript is not a package but a function"

    # An instance whose Nix builds for x86 only says so at once, without starting Nix.
    nix_counter.reset()
    status, error = error_of(server, "arm64/hello")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN")
    assert error["message"].startswith("this instance cannot build for aarch64-linux: its Nix builds for ")
    assert "cannot build for aarch64-linux" in pull_fails(server, "arm64/hello", tmp_path)
    assert nix_counter.count() == 0


def test_unfree_is_served_when_the_operator_allows_it(start_server, pkgset, tmp_path):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_ALLOW_UNFREE": "true"})
    assert skopeo_pull(server.host, "unfreetool", tmp_path / "oci").returncode == 0
    # Broken and insecure stay refused.
    assert error_of(server, "brokentool")[0] == 403


def test_unknown_names_get_suggestions(server, tmp_path):
    status, error = error_of(server, "shell/hellp")
    assert status == 404 and error["message"] == "unknown packages: hellp (did you mean hello?)"
    assert error["detail"] == {"unknown": ["hellp"], "suggestions": {"hellp": ["hello"]}}
    assert "did you mean hello?" in pull_fails(server, "shell/hellp", tmp_path)
    # Nested sets too, named in the set's own spelling; several unknown names each get theirs.
    message = error_of(server, "python3packages.reqests/gti")[1]["message"]
    assert message == ("unknown packages: gti (did you mean git?), "
                       "python3packages.reqests (did you mean python3Packages.requests?)")
    # Nothing close: no suggestion.
    assert error_of(server, "zzzzqqqq")[1]["message"] == "unknown packages: zzzzqqqq"


def scrape(server) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_a_long_build_shows_its_progress(start_server, tmp_path):
    pkgs = make_package_set(tmp_path / "slow-pkgs", salt=f"progress-{time.time_ns()}", slow_seconds=8)
    server = start_server({"NIXERY_PKGS_PATH": str(pkgs)})
    assert scrape(server)["nixery_builds_in_progress"] == 0
    pull = threading.Thread(target=lambda: requests.get(f"{server.url}/v2/slowbuild/manifests/latest", timeout=120))
    pull.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and seen is None:
        running = requests.get(f"{server.url}/builds.json", timeout=10).json()["in_progress"]
        if running and running[0]["step"] == "build" and running[0]["elapsed"] >= 2:
            seen = running[0]
            gauge = scrape(server)["nixery_builds_in_progress"]
            page = requests.get(server.url + "/", timeout=10).text
            logged_meanwhile = server.log_entries()
        time.sleep(0.2)
    assert seen is not None, "the build never showed up in progress"
    assert (seen["image"], seen["tag"], seen["packages"]) == ("slowbuild", "latest", ["slowbuild"])
    assert gauge == 1
    assert "Building now" in page and "slowbuild:latest" in page
    pull.join()

    assert requests.get(f"{server.url}/builds.json", timeout=10).json()["in_progress"] == []
    assert scrape(server)["nixery_builds_in_progress"] == 0
    entries = server.log_entries()
    started = [e for e in entries if e.get("message") == "build started"]
    assert started and started[0]["packages"] == ["slowbuild"] and started[0]["revision"]
    progress = [e["nix"] for e in entries if e.get("message") == "nix progress" and e.get("image") == "slowbuild"]
    assert any(line.startswith("building '/nix/store/") and "slow-build.drv" in line for line in progress), progress
    # Streamed as it happened: the line was in the log while the build still ran.
    assert any(e.get("message") == "nix progress" and "slow-build.drv" in e["nix"] for e in logged_meanwhile)
    assert seen["detail"] and "slow-build.drv" in seen["detail"], seen
    info = requests.get(f"{server.url}/metrics", timeout=30).text
    assert 'nixery_build_info{source="path",version="' in info


def test_access_log_and_quiet_tls_probes(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_ACCESS_LOG": "true"})
    requests.get(f"{server.url}/v2/", headers={"User-Agent": "probe-test"}, timeout=10)
    for _ in range(5):  # what skopeo and Docker send first on a plain-HTTP port: a TLS ClientHello
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\n")
            conn.recv(1024)
    time.sleep(0.5)
    entries = server.log_entries()
    access = [e for e in entries if e.get("logger") == "nixery.access" and e.get("user_agent") == "probe-test"]
    assert len(access) == 1
    assert {k: access[0][k] for k in ("method", "path", "status", "bytes", "client")} == \
        {"method": "GET", "path": "/v2/", "status": 200, "bytes": 2, "client": "127.0.0.1"}
    probes = [e for e in entries if "Invalid HTTP request line" in e.get("message", "")]
    assert 1 <= len(probes) <= 2, probes  # at most one per worker, none of them a warning
    assert all(e["level"] == "INFO" for e in probes), probes
