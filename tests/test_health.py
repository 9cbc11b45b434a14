"""`/healthz` and `/readyz`: in process through the real app, then against a real server."""

from __future__ import annotations

import shutil

import pytest
import requests
from falcon import testing

from nixery import config as configuration
from nixery.app import create_app
from nixery.health import Readiness
from nixery.storage.filesystem import FilesystemBackend


@pytest.fixture
def client(tmp_path, pkgset):
    config = configuration.load({"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp_path / "storage"),
                                 "NIXERY_STATE_DIR": str(tmp_path / "state")})
    return testing.TestClient(create_app(config))


def test_healthz_and_readyz_answer_through_the_app(client):
    live = client.simulate_get("/healthz")
    assert live.status_code == 200 and live.json == {"status": "ok"}
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 200 and ready.json == {"status": "ready"}
    assert ready.headers["Cache-Control"] == "no-store"
    assert client.simulate_head("/readyz").status_code == 200


def test_readyz_is_503_without_nix_on_path(client, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 503
    assert ready.json == {"status": "unavailable", "reason": "not on PATH: nix-instantiate, nix-build, nix"}
    # Liveness does not depend on what the instance can do.
    assert client.simulate_get("/healthz").status_code == 200


def test_readyz_is_503_through_the_app_with_storage_gone(client, tmp_path):
    shutil.rmtree(tmp_path / "storage")  # before the first probe: nothing cached yet
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 503 and ready.json["status"] == "unavailable"
    assert ready.json["reason"].startswith("filesystem storage failed:")
    assert client.simulate_get("/healthz").status_code == 200


def test_readyz_follows_storage_and_caches_its_answer(tmp_path):
    root = tmp_path / "storage"
    now = [100.0]
    readiness = Readiness(FilesystemBackend(root), ttl=5, clock=lambda: now[0])
    assert readiness.reason() is None

    shutil.rmtree(root)  # the volume went away
    assert readiness.reason() is None, "answered again within the cache time"
    now[0] += 5
    reason = readiness.reason()
    assert reason is not None and reason.startswith("filesystem storage failed:") and "\n" not in reason

    (root / "tmp").mkdir(parents=True)  # back
    now[0] += 1
    assert readiness.reason() == reason
    now[0] += 4
    assert readiness.reason() is None


def test_a_real_server_answers_the_probes(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset)})
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.headers["Content-Type"].startswith("application/json")
