"""A package set that cannot build for the image's architecture is refused with a clear 4xx,
instead of serving this machine's binaries under another architecture's name."""

from __future__ import annotations

import platform

import pytest
import requests

from pkgset import including
from support import NIX_ENV, skopeo_pull
from nixery.nix import Nix, SourceArgs, UnsupportedSystem

HOST_SYSTEM = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux"}[platform.machine()]
OTHER_SYSTEM = "aarch64-linux" if HOST_SYSTEM == "x86_64-linux" else "x86_64-linux"
OTHER_PREFIX = "arm64" if OTHER_SYSTEM == "aarch64-linux" else "amd64"


def wrapped_set(tmp_path, pkgset, kind: str):
    """A directory whose default.nix is the test set as a plain attribute set, or as a
    function without a `system` argument."""
    directory = tmp_path / kind
    directory.mkdir()
    inner = f"import {including(directory, pkgset)} {{ system = builtins.currentSystem; }}"
    text = inner if kind == "plain" else f"{{ }}: {inner}"
    (directory / "default.nix").write_text(text + "\n")
    return directory


@pytest.mark.skipif(OTHER_PREFIX != "arm64", reason="the other architecture's meta-package is arm64 only")
def test_plain_set_refuses_arm64_with_a_registry_error(tmp_path, pkgset, start_server):
    source = wrapped_set(tmp_path, pkgset, "plain")
    # Nix told it can build for the other system, so that the set's own refusal is what answers
    # (an instance that cannot is refused before Nix runs: tests/test_feedback.py).
    server = start_server({"NIXERY_PKGS_PATH": str(source),
                           "NIX_CONFIG": f"{NIX_ENV['NIX_CONFIG']}\nextra-platforms = {OTHER_SYSTEM}"})

    response = requests.get(f"{server.url}/v2/arm64/hello/manifests/latest", timeout=120)
    assert response.status_code == 404, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    (error,) = response.json()["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "\n" not in error["message"]
    assert error["message"] == (f"the package set builds only for {HOST_SYSTEM} (it is a plain attribute set),"
                                f" not for {OTHER_SYSTEM}")
    assert error["detail"] == {"system": OTHER_SYSTEM}

    # A real client sees the same one-line reason.
    pull = skopeo_pull(server.host, "arm64/hello", tmp_path / "oci")
    assert pull.returncode != 0 and "builds only for" in pull.stderr, pull.stderr

    # The machine's own architecture is served from the same set.
    ok = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=300)
    assert ok.status_code == 200, ok.text
    config_digest = ok.json()["config"]["digest"]
    config = requests.get(f"{server.url}/v2/hello/blobs/{config_digest}", timeout=60).json()
    assert config["architecture"] == {"x86_64-linux": "amd64", "aarch64-linux": "arm64"}[HOST_SYSTEM]


def test_function_without_system_is_refused_and_nixpkgs_shape_is_not(tmp_path, pkgset):
    nix = Nix(60, tmp_path / "gcroots")
    function = wrapped_set(tmp_path, pkgset, "function")
    args = SourceArgs("path", str(function), "test set")
    with pytest.raises(UnsupportedSystem, match="a function without a `system` argument"):
        nix.resolve(["hello"], [], args, OTHER_SYSTEM)
    # On the machine's own system the same function is called without arguments.
    assert set(nix.resolve(["hello"], [], args, HOST_SYSTEM)) == {"hello"}
    # A set taking `system` (nixpkgs' shape) is asked for the other system and answers with
    # that system's derivation: another output path than the machine's own.
    own = SourceArgs("path", str(pkgset), "test set")
    other = nix.resolve(["hello"], [], own, OTHER_SYSTEM)["hello"]
    assert other != nix.resolve(["hello"], [], own, HOST_SYSTEM)["hello"]
