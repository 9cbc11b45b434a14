"""Many instances without rebuilding: two Nixery instances with separate Nix stores and one
`file://` binary cache. The second serves an image the first built without building anything.

The second store is a fresh directory bind-mounted over /nix in a mount namespace of the
second server alone. (A chroot store, `--store local?root=DIR`, keeps its files under DIR,
while Nixery archives layers from /nix/store itself, so it cannot serve from one.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from support import NIX_ENV, chroot_run, pull_and_unpack
from nixery import config as configuration
from nixery.config import BinaryCacheConfig
from nixery.image import OPTIONAL_PACKAGES
from nixery.nix.cache import substituter_options

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def nix_key(directory: Path, name: str) -> tuple[Path, str]:
    secret = directory / "cache.secret"
    secret.write_bytes(subprocess.run([*NIX, "key", "generate-secret", "--key-name", name],
                                      capture_output=True, check=True).stdout)
    public = subprocess.run([*NIX, "key", "convert-secret-to-public"], input=secret.read_bytes(),
                            capture_output=True, check=True).stdout.decode().strip()
    return secret, public


def in_store(store: Path, *argv: str) -> list[str]:
    """argv run with `store` as /nix, in a mount namespace of its own.

    Its builds run without build users: those are the machine's uids, shared by both stores, and
    Nix kills every process of a build user before it builds as that user, so two stores that
    build at once (another test's server on the real store) would kill each other's builders."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /nix && NIX_CONFIG="$NIX_CONFIG\nbuild-users-group =" exec "$@"', str(store), *argv]


def path_info(closure_of: list[str], store: Path | None = None) -> list[dict]:
    argv = [*NIX, "path-info", "--json", "--recursive", *closure_of]
    result = subprocess.run(in_store(store, *argv) if store else argv, capture_output=True, text=True,
                            env={**NIX_ENV, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_second_instance_substitutes_what_the_first_built(tmp_path, fresh_pkgset, start_server, monkeypatch):
    secret, public = nix_key(tmp_path, "nixery-test-1")
    cache = tmp_path / "binary-cache"
    shared = {"NIXERY_PKGS_PATH": str(fresh_pkgset), "NIXERY_BINARY_CACHE": f"file://{cache}",
              "NIXERY_BINARY_CACHE_PUBLIC_KEY": public}

    first = start_server({**shared, "NIXERY_BINARY_CACHE_SECRET_KEY": str(secret)})
    (tmp_path / "first").mkdir()
    started = time.monotonic()
    rootfs = pull_and_unpack(first.host, "greeter", tmp_path / "first")
    first_seconds = time.monotonic() - started
    assert "Hello, world!" in chroot_run(rootfs, "/bin/greeter")
    manifest_first = requests.get(f"{first.url}/v2/greeter/manifests/latest", timeout=60).json()
    # Everything the image holds: the package and the optional ones every image gets.
    names = ["greeter", *OPTIONAL_PACKAGES]
    evaluated = subprocess.run(["nix-instantiate", "--eval", "--json", "--strict", "-E",
                                f"with import {fresh_pkgset} {{ }}; map toString [ {' '.join(names)} ]"],
                               capture_output=True, text=True, check=True, env={**NIX_ENV, "PATH": "/usr/bin:/bin"})
    outputs = json.loads(evaluated.stdout)
    built_here = path_info(outputs)
    # The first instance built the closure itself (Nix marks such paths "ultimate")...
    assert all(info.get("ultimate") for info in built_here), built_here
    # ...and copied it, signed, to the cache.
    narinfos = {p.name.removesuffix(".narinfo") for p in cache.glob("*.narinfo")}
    assert {Path(info["path"]).name.split("-")[0] for info in built_here} <= narinfos

    # The second instance: an empty Nix store of its own, its own storage, the same cache.
    store = tmp_path / "second-store" / "nix"
    store.mkdir(parents=True)
    wrapper = tmp_path / "python-in-second-store"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.join(in_store(store, sys.executable))} \"$@\"\n")
    wrapper.chmod(0o755)
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", str(wrapper))
        second = start_server(shared)
    (tmp_path / "second").mkdir()
    started = time.monotonic()
    rootfs = pull_and_unpack(second.host, "greeter", tmp_path / "second")
    second_seconds = time.monotonic() - started
    assert "Hello, world!" in chroot_run(rootfs, "/bin/greeter")
    manifest_second = requests.get(f"{second.url}/v2/greeter/manifests/latest", timeout=60).json()
    # The same store paths, archived by the second instance from its own store: the same layers.
    assert manifest_second["layers"] == manifest_first["layers"]

    substituted = path_info(outputs, store)
    assert {i["path"] for i in substituted} == {i["path"] for i in built_here}
    built_by_second = [i["path"] for i in substituted if i.get("ultimate")]
    assert built_by_second == [], f"the second instance built {built_by_second}"
    assert all(any(s.startswith("nixery-test-1:") for s in i.get("signatures", [])) for i in substituted)

    # The same options with another key: the cache's paths are refused, and built instead.
    other_store = tmp_path / "third-store" / "nix"
    other_store.mkdir(parents=True)
    _, foreign = nix_key(tmp_path / "third-store", "someone-else-1")
    options = substituter_options(BinaryCacheConfig(f"file://{cache}", foreign, None))
    build = subprocess.run(in_store(other_store, "nix-build", *options, "--no-out-link", str(fresh_pkgset),
                                    "-A", "greeter"), capture_output=True, text=True, timeout=300,
                           env={**NIX_ENV, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    assert build.returncode == 0, build.stderr
    assert "is not signed by any of the keys in 'trusted-public-keys'" in build.stderr
    assert "building '" in build.stderr and "copying path" not in build.stderr
    assert all(info.get("ultimate") for info in path_info(outputs[:1], other_store))

    print(f"\nfirst instance: built {len(built_here)} store paths, pull took {first_seconds:.2f} s; "
          f"second instance: {len(substituted)} substituted, {len(built_by_second)} built, "
          f"pull took {second_seconds:.2f} s")


def test_a_cache_that_cannot_be_written_costs_no_pull(tmp_path, pkgset, start_server):
    """The copy fails (the cache's directory is under a file): logged, and the image is served."""
    secret, public = nix_key(tmp_path, "nixery-test-3")
    (tmp_path / "not-a-directory").write_text("")
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_BINARY_CACHE_PUBLIC_KEY": public,
                           "NIXERY_BINARY_CACHE": f"file://{tmp_path}/not-a-directory/cache",
                           "NIXERY_BINARY_CACHE_SECRET_KEY": str(secret)})
    response = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=300)
    assert response.status_code == 200, response.text
    failures = [e for e in server.log_entries() if e.get("message") == "binary cache copy failed"]
    assert failures and failures[0]["reason"].startswith("copying to the binary cache failed: error:")


def test_an_unsigned_or_foreign_cache_is_refused(tmp_path):
    secret, public = nix_key(tmp_path, "nixery-test-2")
    with pytest.raises(configuration.ConfigError, match="NIXERY_BINARY_CACHE_PUBLIC_KEY"):
        configuration.load({"NIXERY_BINARY_CACHE": f"file://{tmp_path}"})
    with pytest.raises(configuration.ConfigError, match="secret-key"):
        configuration.load({"NIXERY_BINARY_CACHE": f"file://{tmp_path}?secret-key=/x",
                            "NIXERY_BINARY_CACHE_PUBLIC_KEY": public})
    with pytest.raises(configuration.ConfigError, match="NIXERY_BINARY_CACHE_SECRET_KEY"):
        configuration.load({"NIXERY_BINARY_CACHE": f"file://{tmp_path}", "NIXERY_BINARY_CACHE_PUBLIC_KEY": public,
                            "NIXERY_BINARY_CACHE_SECRET_KEY": str(tmp_path / "missing")})
    with pytest.raises(configuration.ConfigError, match="need NIXERY_BINARY_CACHE"):
        configuration.load({"NIXERY_BINARY_CACHE_PUBLIC_KEY": public})
    loaded = configuration.load({"NIXERY_BINARY_CACHE": f"file://{tmp_path}", "NIXERY_BINARY_CACHE_PUBLIC_KEY": public,
                                 "NIXERY_BINARY_CACHE_SECRET_KEY": str(secret)}).binary_cache
    assert loaded.public_key == public and loaded.secret_key == secret
    assert configuration.load({}).binary_cache is None
