"""A public instance under hostile and heavy load (issue 10): a storm of distinct unknown names
costs one evaluation each and leaves no state behind, and repeats cost none. A module of its
own: its thousand evaluations are the longest test, and the parallel run gives it a worker."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import requests

from load_support import small_set


def state_files(state: Path) -> int:
    """Files under the state directory, less prometheus_client's (one set per worker process,
    made at a worker's first request whichever name it is for)."""
    return sum(len(files) for root, _, files in os.walk(state) if "prometheus" not in Path(root).parts)


def test_unknown_names_cost_one_evaluation_and_no_state(start_server, pkgset, nix_counter, tmp_path):
    # A set of five packages: a thousand evaluations of it cost a fraction of the big test set's.
    packages = small_set(tmp_path / "set", pkgset, seconds=0)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "PATH": nix_counter.path(),
                           "NIXERY_CLIENT_BUILDS": "16", "NIXERY_FAILURE_TTL": "600"})
    state = server.workdir / "state"
    session = requests.Session()
    assert session.get(f"{server.url}/v2/nosuchwarmup/manifests/latest", timeout=60).status_code == 404
    assert session.get(f"{server.url}/v2/failing/manifests/latest", timeout=60).status_code == 422
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
    assert "failing" in [e["image"] for e in errors if e["outcome"] == "failed"]
