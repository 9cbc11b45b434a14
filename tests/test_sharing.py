"""Layer sharing between related images, through a real server and a real client.

An image that differs from one built before by a package archives only the
layers that hold new store paths; every other layer is found through its
record, and a client that pulled the first image downloads only those.
"""

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import requests

from support import NIX_ENV, oci_manifest


def closure(pkgset: Path, *attrs: str) -> set[str]:
    env = {**os.environ, **NIX_ENV}
    outs = subprocess.run(["nix-build", str(pkgset), *(a for attr in attrs for a in ("-A", attr)), "--no-out-link"],
                          env=env, capture_output=True, text=True, check=True).stdout.split()
    return set(subprocess.run(["nix-store", "-qR", *outs], capture_output=True, text=True, check=True).stdout.split())


def store_paths_in(blob: Path) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(blob.read_bytes())) as tar:
        return {"/" + "/".join(m.name.split("/")[:3]) for m in tar.getmembers() if m.name.startswith("nix/store/")
                and m.name.count("/") >= 2}


def pull(host: str, name: str, oci: Path, ref: str) -> None:
    """`skopeo copy` of NAME:latest into the OCI layout `oci`, as `ref`: blobs already there are not fetched."""
    result = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/{name}:latest",
                             f"oci:{oci}:{ref}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def last_build(server) -> dict:
    return requests.get(f"{server.url}/builds.json", timeout=10).json()["builds"][0]


@pytest.mark.parametrize("budget", ["94", "12"])
def test_one_more_package_archives_only_layers_holding_new_paths(pkgset, start_server, tmp_path, budget):
    # The shared package set: what is archived or reused is decided by the layer records in the
    # server's own (new) storage, not by whether Nix built the paths now or earlier.
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_LAYER_BUDGET": budget,
                           "NIX_TIMEOUT": "300"})
    oci = tmp_path / "oci"
    pull(server.host, "curl/git", oci, "first")
    first = last_build(server)
    assert first["image"] == "curl/git" and first["layers_reused"] == 0
    blobs_before = set(os.listdir(oci / "blobs" / "sha256"))

    pull(server.host, "curl/git/jq", oci, "second")
    second = last_build(server)
    assert second["image"] == "curl/git/jq"
    old = closure(pkgset, "curl", "git", "cacert", "iana-etc")
    new = closure(pkgset, "curl", "git", "jq", "cacert", "iana-etc") - old
    assert {os.path.basename(p).split("-", 1)[1] for p in new} == {"jq-1.7.1-bin", "oniguruma-6.9.9-lib"}

    manifest = oci_manifest(oci, "second")
    storage = server.workdir / "storage" / "layers"
    layers = {layer["digest"]: store_paths_in(storage / layer["digest"]) for layer in manifest["layers"][:-1]}
    holding_new = {digest for digest, paths in layers.items() if paths & new}
    # Archived: the layers holding new paths and the root layer; everything else was reused.
    assert second["layers_built"] == len(holding_new) + 1
    assert second["layers_reused"] == len(layers) - len(holding_new)
    if budget == "94":
        assert len(holding_new) == len(new) and all(len(layers[d]) == 1 for d in holding_new)
    # What the client downloaded the second time: those layers, the root layer, the config, the manifest.
    downloaded = set(os.listdir(oci / "blobs" / "sha256")) - blobs_before
    assert {f"sha256:{d}" for d in downloaded} >= holding_new
    assert len(downloaded) == len(holding_new) + 3
