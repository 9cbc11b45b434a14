"""The web page, recent builds, metrics and logs, seen as a browser (tests/browser.py), a script
and Prometheus see them."""

from __future__ import annotations

import html
import json
import multiprocessing
import struct
import subprocess
import sys
import time
from pathlib import Path

import falcon
import falcon.testing
import pytest
import requests
from browser import DESKTOP, PHONE, browser  # noqa: F401 (a fixture)
from support import oci_manifest, skopeo_pull
from prometheus_client.parser import text_string_to_metric_families

from nixery import web
from nixery.stats import BuildStats
from nixery.config import StateLayout, load
from nixery.history import BuildHistory, entry

MANIFESTS_ROUTE = "/v2/{name}/manifests/{reference}"


@pytest.fixture
def server(shared_server):
    """These tests only read (the metrics they check are counted before and after): they share
    one server with test_e2e.py."""
    return shared_server


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_page_in_headless_chromium(server, browser, tmp_path):
    assert requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=120).status_code == 200
    assert requests.get(f"{server.url}/v2/broken/manifests/latest", timeout=120).status_code == 422
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        browser.load(server.url + "/", width, height)
        assert browser.evaluate("document.getElementById('pull-command').textContent") == \
            f"docker pull {server.host}/shell/git/htop"
        assert browser.evaluate("document.title").startswith("Nixery")
        # The stylesheet was loaded and applied (the masthead has a colour), and nothing overflows sideways.
        assert browser.evaluate("getComputedStyle(document.querySelector('.masthead')).backgroundColor") \
            not in ("", "rgba(0, 0, 0, 0)")
        assert browser.evaluate("document.documentElement.scrollWidth") <= width
        text = browser.evaluate("document.body.innerText")
        assert "shell/hello:latest" in text and "broken:latest" in text
        assert browser.problems() == [], browser.problems()
        browser.screenshot(shots / f"{label}.png", width)
        shot_width, shot_height = png_size(shots / f"{label}.png")
        assert shot_width == width and shot_height >= height, (label, shot_width, shot_height)
    print(f"screenshots in {shots}")


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = requests.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_after_two_pulls(start_server, fresh_pkgset, tmp_path):
    server = start_server({"NIXERY_PKGS_PATH": str(fresh_pkgset), "NIXERY_WORKERS": "2"})
    before = scrape(server)
    assert skopeo_pull(server.host, "hello", tmp_path / "first").returncode == 0
    assert skopeo_pull(server.host, "greeter", tmp_path / "second").returncode == 0
    after = scrape(server)
    for _ in range(20):  # spread over both workers: the scrape must add them up
        assert requests.get(server.url + "/v2/", timeout=30).status_code == 200
    pings = moved(after, scrape(server), "nixery_http_requests_total", route="/v2", method="GET", status="200")
    assert pings == 20

    first = {layer["digest"]: layer["size"] for layer in oci_manifest(tmp_path / "first")["layers"]}
    second = {layer["digest"]: layer["size"] for layer in oci_manifest(tmp_path / "second")["layers"]}
    shared = first.keys() & second.keys()
    assert shared, "greeter shares busybox's layer (at least) with hello"
    assert moved(before, after, "nixery_builds_total", outcome="built") == 2
    assert moved(before, after, "nixery_build_duration_seconds_count", outcome="built") == 2
    assert moved(before, after, "nixery_layers_total", result="built") == len(first) + len(second) - len(shared)
    assert moved(before, after, "nixery_layers_total", result="reused") == len(shared)
    assert moved(before, after, "nixery_layer_bytes_total", result="written") == \
        sum(first.values()) + sum(size for digest, size in second.items() if digest not in shared)
    assert moved(before, after, "nixery_layer_bytes_total", result="reused") == sum(second[d] for d in shared)
    for step in ("evaluate", "build", "layer", "upload"):
        assert moved(before, after, "nixery_build_step_duration_seconds_count", step=step) == 2, step
    # Per image: one evaluation, one build, one closure query, and one call rooting its packages.
    for command, calls in (("nix-instantiate", 2), ("nix-store", 4), ("nix", 2)):
        assert moved(before, after, "nixery_nix_invocations_total", command=command) == calls, command
    assert moved(before, after, "nixery_http_requests_total", route=MANIFESTS_ROUTE, method="GET", status="200") == 2
    # Routes are labelled by template: image names never become label values.
    routes = {dict(labels).get("route") for (_, labels) in after} - {None}
    assert not any("hello" in route or "greeter" in route for route in routes), routes


def test_failed_build_in_recent_errors(server):
    before = scrape(server)
    # A package whose build fails fails again: a 4xx (422), but a failed build ("failed"), kept apart
    # from rejected names so that those cannot push it off the list.
    failed = requests.get(f"{server.url}/v2/broken/manifests/latest", timeout=120)
    assert failed.status_code == 422
    reason = failed.json()["errors"][0]["message"]
    rejected = requests.get(f"{server.url}/v2/shell/nosuchpkg/manifests/latest", timeout=120)
    assert rejected.status_code == 404

    data = requests.get(server.url + "/builds.json", timeout=30).json()
    newest, older = data["errors"][:2]
    assert (newest["image"], newest["outcome"]) == ("shell/nosuchpkg", "rejected")
    assert newest["reason"] == "unknown packages: nosuchpkg"
    assert (older["image"], older["tag"], older["outcome"]) == ("broken", "latest", "failed")
    assert older["reason"] == reason and "broken" in reason and "\n" not in reason
    assert older["duration"] > 0
    assert [b["image"] for b in data["builds"][:2]] == ["shell/nosuchpkg", "broken"]

    page = requests.get(server.url + "/", timeout=30).text
    errors_section = page.split('id="errors"', 1)[1]
    assert html.escape(reason) in errors_section and "unknown packages: nosuchpkg" in errors_section

    lines = [line for line in server.log().splitlines() if line]
    assert all(isinstance(json.loads(line), dict) for line in lines), "stderr is JSON lines only, Gunicorn's too"
    logged = [e for e in server.log_entries() if e.get("image") == "broken"]
    assert any(e["message"] == "image build failed" and e["reason"] == reason for e in logged), logged
    assert any(e["message"] == "nix failed" and e["level"] == "ERROR" and "meant to fail" in e["nix_log"]
               for e in logged), "the whole Nix log is in the server log"
    steps = {e["step"]: e["duration"] for e in logged if e.get("message") == "build step"}
    assert set(steps) == {"evaluate", "build"}, steps

    after = scrape(server)
    assert moved(before, after, "nixery_builds_total", outcome="rejected") == 1
    assert moved(before, after, "nixery_builds_total", outcome="failed") == 1


def _record_many(state_dir: str, worker: int, count: int) -> None:
    store = BuildHistory(StateLayout.under(Path(state_dir)), builds_kept=1000)
    for i in range(count):
        store.record(entry(BuildStats(image=f"w{worker}/n{i}"), time.time()))


def test_recent_builds_are_shared_and_trimmed(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.starmap(_record_many, [(str(tmp_path), w, 25) for w in range(4)])
    images = [b["image"] for b in BuildHistory(StateLayout.under(tmp_path)).builds()]
    assert len(set(images)) == len(images) == 100, "no process's write was lost"

    store = BuildHistory(StateLayout.under(tmp_path / "small"), builds_kept=3, errors_kept=2)
    for i in range(5):
        store.record(entry(BuildStats(image=f"bad{i}", reason=f"why {i}", status=500), time.time()))
        store.record(entry(BuildStats(image=f"good{i}"), time.time()))
    assert [b["image"] for b in store.builds()] == ["good4", "bad4", "good3"]
    assert [e["reason"] for e in store.errors()] == ["why 4", "why 3"]


@pytest.mark.parametrize("argument, secret", [
    ("https://builder:s3cret-token@git.example.org/pkgs.git", "s3cret-token"),
])
def test_page_never_shows_secrets(tmp_path, argument, secret):
    config = load({"HOME": str(tmp_path), "NIXERY_PKGS_REPO": argument, "NIXERY_GIT_TOKEN": "tok-123456"})
    app = falcon.App()
    web.add_routes(app, config, BuildHistory(config.state))
    page = falcon.testing.TestClient(app).simulate_get("/").text
    assert "git.example.org/pkgs.git" in page
    assert secret not in page and "tok-123456" not in page


def test_hidden_details_keep_paths_and_history_off_the_page(tmp_path, pkgset):
    """NIXERY_HIDE_DETAILS, for a public instance: no server path, no image anyone asked for."""
    def client(hide: str):
        config = load({"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(pkgset), "NIXERY_HIDE_DETAILS": hide})
        store = BuildHistory(config.state)
        store.record(entry(BuildStats(image="someones/secret-project", reason="unknown packages: x", status=404),
                           time.time()))
        app = falcon.App()
        web.add_routes(app, config, store)
        return falcon.testing.TestClient(app)

    shown = client("false")
    assert str(pkgset) in shown.simulate_get("/").text
    assert "someones/secret-project" in shown.simulate_get("/").text
    assert shown.simulate_get("/builds.json").status_code == 200

    hidden = client("true")
    page = hidden.simulate_get("/").text
    assert str(pkgset) not in page and str(tmp_path) not in page and "someones/secret-project" not in page
    assert "does not list its recent builds" in page
    assert hidden.simulate_get("/builds.json").status_code == 403


def test_page_lists_allowed_channels(tmp_path):
    config = load({"HOME": str(tmp_path), "NIXERY_CHANNEL_ALLOW": "nixos-24.05"})
    app = falcon.App()
    web.add_routes(app, config, BuildHistory(config.state))
    page = falcon.testing.TestClient(app).simulate_get("/").text
    assert "the nixpkgs channel <code>nixos-unstable</code>" in page
    assert "Tags may also name the channels <code>nixos-24.05</code>." in page


def test_metrics_made_after_the_directory_is_prepared_live_in_it(tmp_path):
    """server.prepare_metrics_dir tells prometheus_client, imported already, to keep values in the
    workers' directory: through the library's module-level value class (it has no public way),
    which this fails on first if the library changes. In a process of its own, as the server's."""
    from support import ROOT
    script = ("import sys, prometheus_client\n"
              "from pathlib import Path\n"
              "from nixery.server import prepare_metrics_dir\n"
              "prepare_metrics_dir(Path(sys.argv[1]))\n"
              "from nixery.metrics import Metrics\n"
              "Metrics(Path(sys.argv[1])).count_password_check()\n")
    directory = tmp_path / "prometheus"
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, timeout=60,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert any(path.suffix == ".db" for path in directory.iterdir()), list(directory.iterdir())


def test_typos_cannot_push_a_build_failure_off_the_page(tmp_path):
    """Recent errors are two lists: build failures, and rejected requests (4xx: unknown names, mostly)."""
    config = load({"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(tmp_path)})
    store = BuildHistory(config.state)
    store.record(entry(BuildStats(image="broken", reason="builder for broken failed", status=422), time.time()))
    for i in range(web.ERRORS_SHOWN + 5):
        store.record(entry(BuildStats(image=f"typo{i}", reason=f"unknown packages: typo{i}", status=404), time.time()))
    app = falcon.App()
    web.add_routes(app, config, store)
    page = falcon.testing.TestClient(app).simulate_get("/").text
    failures, rejected = page.split('id="failures"', 1)[1].split('id="rejected"', 1)
    assert "builder for broken failed" in failures and "typo" not in failures
    assert rejected.count("unknown packages: typo") == web.ERRORS_SHOWN
    assert f"typo{web.ERRORS_SHOWN + 4}" in rejected and "typo0:" not in rejected
