"""Bounded requests (issue 20): what one request may cost. A name of too many packages, an image
too big, an evaluation that takes too much memory or time are refused with a reason skopeo
prints, before anything is archived; and a failed derivation is built once per NIXERY_FAILURE_TTL,
whatever names ask for it. Each against a real server, pulled with skopeo where a client would."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import requests

from support import errors_of, skopeo_pull

# Packages that cost what a hostile package set can make them cost. `hog` allocates without bound
# while it is evaluated (30 million list elements, forced: about 3.4 GB unbounded); `spin` computes
# for ever in little memory (2^40 calls); `failing` fails to build, `needsfailing` depends on it, `sleepy` never finishes,
# `p0`...`p19` are small packages a name can add to it.
_SET = r'''
{ system ? builtins.currentSystem, ... }:
let
  bbdir = builtins.path { path = ./busybox-static; name = "busybox-static"; };
  mk = name: script: extra: derivation ({
    inherit name system;
    salt = "@SALT@";
    builder = "${bbdir}/bin/busybox";
    args = [ "sh" "-e" "-c" script ];
    PATH = "${bbdir}/bin";
  } // extra);
  small = name: mk name "mkdir -p $out/bin; echo ${name} > $out/bin/${name}" { };
in rec {
  hello = small "hello";
  big = mk "big" "mkdir -p $out; dd if=/dev/urandom of=$out/blob bs=65536 count=128" { };
  hog = mk "hog" "mkdir $out" { forced = builtins.deepSeq (builtins.genList (x: x) 30000000) "done"; };
  spin = mk "spin" "mkdir $out" {
    forced = toString (let f = n: if n == 0 then 0 else f (n - 1) + f (n - 1); in f 40);
  };
  failing = mk "failing" "echo 'failing on purpose' >&2; exit 3" { };
  sleepy = mk "sleepy" "sleep 600" { };
  needsfailing = mk "needs-failing" "mkdir -p $out; echo ${failing} > $out/ref" { };
} // builtins.listToAttrs (builtins.genList (i: { name = "p${toString i}"; value = small "p${toString i}"; }) 20)
'''


def bounded_set(directory: Path, pkgset: Path) -> Path:
    """The set above, with store paths of its own (a salt), so that every build is a real one."""
    directory.mkdir(parents=True)
    shutil.copytree(pkgset / "busybox-static", directory / "busybox-static", symlinks=True)
    (directory / "default.nix").write_text(_SET.replace("@SALT@", uuid.uuid4().hex[:12]))
    return directory


def stored_files(server) -> set[str]:
    storage = server.workdir / "storage"
    return {str(p.relative_to(storage)) for p in storage.rglob("*") if p.is_file()}


def refused_pull(server, name: str, tmp_path: Path) -> str:
    """skopeo's stderr for a pull that is refused with a 4xx whose message it prints."""
    result = skopeo_pull(server.host, name, tmp_path / f"oci-{uuid.uuid4().hex[:8]}")
    assert result.returncode != 0, f"{name} was pulled"
    assert "unexpected HTTP status" not in result.stderr, result.stderr
    return result.stderr


def test_a_name_of_too_many_packages_is_refused_before_nix_runs(start_server, pkgset, nix_counter, tmp_path):
    server = start_server({"NIXERY_PKGS_PATH": str(bounded_set(tmp_path / "set", pkgset)),
                           "NIXERY_MAX_PACKAGES": "3", "PATH": nix_counter.path()})
    nix_counter.reset()
    before = stored_files(server)
    stderr = refused_pull(server, "hello/p0/p1/p2", tmp_path)
    assert "the name has 4 components; this instance builds images of at most 3 (NIXERY_MAX_PACKAGES)" in stderr
    response = requests.get(f"{server.url}/v2/p0/p1/p2/p3/p4/manifests/latest", timeout=30)
    assert response.status_code == 403 and errors_of(response)[0]["code"] == "DENIED"
    assert errors_of(response)[0]["detail"] == {"components": 5, "max_packages": 3}
    assert nix_counter.count() == 0, "refused without evaluating anything"
    assert stored_files(server) == before
    assert skopeo_pull(server.host, "hello/p0/p1", tmp_path / "ok").returncode == 0, "three components are fine"


def test_an_image_over_the_size_limit_is_refused_before_any_layer_is_archived(start_server, pkgset, tmp_path):
    server = start_server({"NIXERY_PKGS_PATH": str(bounded_set(tmp_path / "set", pkgset)),
                           "NIXERY_MAX_IMAGE_SIZE": "4M"})
    before = stored_files(server)
    stderr = refused_pull(server, "big", tmp_path)
    # `big` holds 8 MiB of random bytes (its NAR a little more); the message gives both sizes.
    assert "the image's packages take 8" in stderr and "more than this instance's limit of 4M " \
        "(NIXERY_MAX_IMAGE_SIZE)" in stderr, stderr
    response = requests.get(f"{server.url}/v2/big/manifests/latest", timeout=60)
    assert response.status_code == 403
    [error] = errors_of(response)
    assert error["code"] == "DENIED" and error["detail"]["max_image_size"] == 4 << 20
    assert error["detail"]["size"] > 8 << 20
    assert stored_files(server) == before, "no layer, config or manifest of the refused image was stored"
    assert skopeo_pull(server.host, "hello", tmp_path / "ok").returncode == 0, "a small image is served"


def _no_evaluation_left(packages: Path) -> None:
    deadline = time.monotonic() + 5
    while (left := subprocess.run(["pgrep", "-f", f"srcArgs {packages}"], capture_output=True, text=True).stdout
           .split()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "the evaluation was stopped"


def test_an_evaluation_that_allocates_without_bound_is_stopped_at_the_memory_limit(start_server, pkgset, tmp_path):
    packages = bounded_set(tmp_path / "set", pkgset)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_EVAL_MEMORY": "256M"})
    started = time.monotonic()
    stderr = refused_pull(server, "hog", tmp_path)
    assert "needed more than 256M of memory, this instance's limit (NIXERY_EVAL_MEMORY)" in stderr, stderr
    assert time.monotonic() - started < 20, "stopped at the bound, not after evaluating everything"
    _no_evaluation_left(packages)
    # The server is healthy: it answers, and builds the next image.
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert skopeo_pull(server.host, "hello", tmp_path / "ok").returncode == 0


def test_an_evaluation_that_runs_for_ever_is_stopped_at_the_time_limit(start_server, pkgset, tmp_path):
    packages = bounded_set(tmp_path / "set", pkgset)
    server = start_server({"NIXERY_PKGS_PATH": str(packages), "NIXERY_EVAL_TIMEOUT": "3", "NIX_TIMEOUT": "600"})
    started = time.monotonic()
    stderr = refused_pull(server, "spin", tmp_path)
    assert "took longer than 3s, this instance's limit (NIXERY_EVAL_TIMEOUT)" in stderr, stderr
    assert time.monotonic() - started < 30
    _no_evaluation_left(packages)
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert skopeo_pull(server.host, "hello", tmp_path / "ok").returncode == 0


def test_twenty_names_needing_one_failing_package_run_one_build(start_server, pkgset, nix_counter, tmp_path):
    """`failing/p0` ... `failing/p19` are twenty images, asked for at once by one client, built
    four at a time: the first build's failure is remembered by derivation, and every other name
    that needs it (or needs a package that depends on it) is answered with it without building."""
    server = start_server({"NIXERY_PKGS_PATH": str(bounded_set(tmp_path / "set", pkgset)), "PATH": nix_counter.path(),
                           "NIXERY_MAX_BUILDS": "4", "NIXERY_CLIENT_BUILDS": "32", "NIXERY_FAILURE_TTL": "600"})
    nix_counter.reset()
    names = [f"failing/p{i}" for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda name: requests.get(f"{server.url}/v2/{name}/manifests/latest",
                                                            timeout=120), names))
    assert [r.status_code for r in responses] == [422] * 20, [r.text for r in responses]
    for response in responses:
        [error] = errors_of(response)
        assert error["message"].startswith("failing failed to build: builder for '/nix/store/"), error
    builds = [line for line in nix_counter.calls.read_text().splitlines() if line.startswith("nix-store --realise")]
    assert len(builds) == 1, builds
    assert nix_counter.count("nix-instantiate") == 20, "each name is evaluated: its derivations are what is known"

    # A package that depends on it, in a name of its own: the same failure, as a dependency's.
    stderr = refused_pull(server, "needsfailing", tmp_path)
    assert "a dependency failed to build: builder for '/nix/store/" in stderr and "-failing.drv'" in stderr, stderr
    builds = [line for line in nix_counter.calls.read_text().splitlines() if line.startswith("nix-store --realise")]
    assert len(builds) == 1, builds


def test_a_derivation_that_timed_out_is_not_built_again_within_the_ttl(start_server, pkgset, nix_counter, tmp_path):
    """A build stopped at NIX_TIMEOUT is refused with its reason (422): the same derivation would
    take as long again, so five names needing it, asked for at once, wait for one build."""
    server = start_server({"NIXERY_PKGS_PATH": str(bounded_set(tmp_path / "set", pkgset)), "PATH": nix_counter.path(),
                           "NIX_TIMEOUT": "2", "NIXERY_MAX_BUILDS": "4", "NIXERY_CLIENT_BUILDS": "32"})
    nix_counter.reset()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda i: requests.get(f"{server.url}/v2/sleepy/p{i}/manifests/latest",
                                                         timeout=120), range(5)))
    assert [r.status_code for r in responses] == [422] * 5, [r.text for r in responses]
    for response in responses:
        [error] = errors_of(response)
        assert "-sleepy.drv!out' from .drv file timed out after 2 seconds" in error["message"], error
    builds = [line for line in nix_counter.calls.read_text().splitlines() if line.startswith("nix-store --realise")]
    assert len(builds) == 1, builds
    assert time.monotonic() - started < 30
