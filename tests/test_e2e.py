"""End to end: the real server under Gunicorn, pulled by skopeo, unpacked by umoci, run in a chroot."""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import signal
import subprocess
import time

import pytest
import requests

from nixery.nix.processes import start_time
from nixery.storage.filesystem import tmp_prefix
from support import chroot_run, errors_of, oci_manifest, pull_and_unpack, skopeo_pull

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def server(shared_server):
    """These tests only read: they share one server (and what it built) with test_web.py."""
    return shared_server


def test_shell_image_runs_in_a_chroot(server, tmp_path):
    rootfs = pull_and_unpack(server.host, "shell/hello", tmp_path)
    assert chroot_run(rootfs, "/bin/hello") == "Hello, world!\n"
    assert chroot_run(rootfs, "/bin/sh", "-c", "echo $((6 * 7))") == "42\n"
    assert chroot_run(rootfs, "/usr/bin/env", "echo", "via-env") == "via-env\n"
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (rootfs / "etc/ssl/certs/ca-bundle.crt").read_text().startswith("# test CA bundle")
    assert (rootfs / "etc/services").exists()

    config_digest = oci_manifest(tmp_path / "oci")["config"]["digest"]
    config = json.loads((tmp_path / "oci/blobs/sha256" / config_digest.split(":")[1]).read_text())
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["Cmd"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["config"]["Env"]


def test_nested_case_insensitive_and_digit_names(server, tmp_path):
    rootfs = pull_and_unpack(server.host, "tools.greet/python3packages.requests/7zip", tmp_path)
    assert chroot_run(rootfs, "/bin/greet") == "nested-greet\n"
    assert (rootfs / "bin/requests").is_symlink()
    assert (rootfs / "bin/7z").is_symlink()
    assert not (rootfs / "usr/bin/env").exists(), "no coreutils asked for, so no /usr/bin/env"


def test_same_image_twice_gives_the_same_digest(server, tmp_path):
    first = requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=120)
    second = requests.get(f"{server.url}/v2/shell/hello/hello/manifests/latest", timeout=120)
    assert first.status_code == second.status_code == 200
    digest = first.headers["Docker-Content-Digest"]
    assert digest == second.headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(first.content).hexdigest()
    assert first.headers["Content-Type"] == MANIFEST_V2

    # A client pulling twice gets the same manifest too.
    assert skopeo_pull(server.host, "shell/hello", tmp_path / "a").returncode == 0
    assert skopeo_pull(server.host, "shell/hello", tmp_path / "b").returncode == 0
    assert oci_manifest(tmp_path / "a") == oci_manifest(tmp_path / "b")

    by_digest = requests.get(f"{server.url}/v2/shell/hello/manifests/{digest}", timeout=30)
    assert by_digest.status_code == 200 and by_digest.content == first.content
    head = requests.head(f"{server.url}/v2/shell/hello/manifests/latest", timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Docker-Content-Digest"] == digest
    assert int(head.headers["Content-Length"]) == len(first.content)


def test_images_sharing_packages_share_layers(server):
    hello = requests.get(f"{server.url}/v2/shell/hello/manifests/latest", timeout=120).json()
    blobs = server.workdir / "storage" / "layers"
    written = {layer["digest"]: (blobs / layer["digest"]).stat().st_ino for layer in hello["layers"]}
    greeter = requests.get(f"{server.url}/v2/shell/greeter/manifests/latest", timeout=120).json()
    hello_layers = {layer["digest"] for layer in hello["layers"]}
    greeter_layers = {layer["digest"] for layer in greeter["layers"]}
    shared = hello_layers & greeter_layers
    # Everything but the root layer is in both: each store path has a layer of its own (the
    # closures fit the layer budget), hello's included, so greeter's image reuses it.
    assert len(shared) == len(hello_layers) - 1, (hello_layers, greeter_layers)
    biggest = max(hello["layers"], key=lambda layer: layer["size"])
    assert biggest["digest"] in shared
    # The shared layers were found through their records, not archived again (a file written again
    # is a new file; reusing one only marks it used, for the collector: its modification time).
    assert {d: (blobs / d).stat().st_ino for d in shared} == {d: written[d] for d in shared}


def test_unknown_packages_are_404_naming_each(server):
    response = requests.get(f"{server.url}/v2/shell/hello/nosuchthing/alsomissing/manifests/latest", timeout=60)
    assert response.status_code == 404
    [error] = errors_of(response)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert sorted(error["detail"]["unknown"]) == ["alsomissing", "nosuchthing"]
    assert "nosuchthing" in error["message"] and "alsomissing" in error["message"]


def test_failing_build_is_422_with_a_short_reason(server):
    # It fails the same way every time: a 4xx, whose message registry clients print.
    response = requests.get(f"{server.url}/v2/broken/manifests/latest", timeout=60)
    assert response.status_code == 422
    [error] = errors_of(response)
    assert error["code"] == "UNKNOWN"
    assert "broken" in error["message"] and "\n" not in error["message"]
    assert len(error["message"]) < 500
    # The full Nix log goes to the server log only.
    assert any("meant to fail" in e.get("nix_log", "") for e in server.log_entries())
    assert "meant to fail" not in response.text


def test_ten_concurrent_pulls_run_nix_once(start_server, fresh_pkgset, nix_counter):
    server = start_server({"NIXERY_PKGS_PATH": str(fresh_pkgset), "PATH": nix_counter.path(),
                           "NIXERY_WORKERS": "3", "NIXERY_THREADS": "4"})
    nix_counter.reset()
    url = f"{server.url}/v2/slowbuild/slow/manifests/latest"
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: requests.get(url, timeout=180), range(10)))
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses if r.status_code != 200]
    assert len({r.headers["Docker-Content-Digest"] for r in responses}) == 1
    # One evaluation (nix-instantiate), whose derivations nix-store builds: the set is not evaluated again;
    # and one nix-store call that roots the stored image's packages (nixery/nixstore.py).
    assert nix_counter.count("nix-instantiate") == 1
    assert nix_counter.builds() == 1 and nix_counter.count("nix-store") == 2
    assert nix_counter.count("nix-build") == 0


def test_nix_timeout_is_a_422_naming_it_and_kills_the_build(start_server, tmp_path):
    from pkgset import make_package_set
    import uuid
    slow = make_package_set(tmp_path / "slow-set", salt=uuid.uuid4().hex[:12], slow_seconds=117)
    server = start_server({"NIXERY_PKGS_PATH": str(slow), "NIX_TIMEOUT": "3"})
    started = time.monotonic()
    response = requests.get(f"{server.url}/v2/slowbuild/manifests/latest", timeout=60)
    assert time.monotonic() - started < 30
    # The same derivation times out again: a 4xx, whose reason registry clients print.
    assert response.status_code == 422
    [error] = errors_of(response)
    # Nix's own --max-silent-time stopped the builder (NIX_TIMEOUT bounds silence and run time).
    assert error["code"] == "UNKNOWN" and "timed out after 3 seconds" in error["message"]
    assert error["message"].startswith("slowbuild did not finish building within this instance's build timeout "
                                       "(NIX_TIMEOUT): building of '/nix/store/")
    assert error["detail"]["limit"] == "NIX_TIMEOUT" and error["detail"]["derivation"].endswith("-slow-build.drv")
    deadline = time.monotonic() + 1  # a second for the killed processes to be gone
    for pattern in (str(slow), "sleep 117"):  # nix-build, and the builder in its own session
        while (leftovers := subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftovers == [], f"{pattern} survived the timeout"
    # The server is still there for the next request.
    assert requests.get(f"{server.url}/v2/", timeout=10).status_code == 200


def test_start_up_logs_the_configuration_without_secrets(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_GIT_TOKEN": "very-secret-token"})
    [start] = [e for e in server.log_entries() if e.get("message") == "starting nixery"]
    assert start["config"]["source"] == {"kind": "path", "argument": str(pkgset.resolve())}
    assert start["config"]["layer_budget"] == 94 and start["config"]["git_token"] == "<set>"
    assert "very-secret-token" not in server.log()


def test_oci_form_of_a_real_build_is_stored_and_served_again(server):
    """Negotiation and the OCI form's details are the fast tier's (test_api.py); this is the real builder."""
    url = f"{server.url}/v2/hello/manifests/latest"
    docker = requests.get(url, timeout=120)
    oci = requests.get(url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=120)
    assert oci.status_code == 200
    assert oci.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    assert oci.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(oci.content).hexdigest()
    assert [layer["digest"] for layer in oci.json()["layers"]] == [layer["digest"] for layer in docker.json()["layers"]]
    again = requests.get(f"{server.url}/v2/hello/manifests/{oci.headers['Docker-Content-Digest']}", timeout=30)
    assert again.content == oci.content and again.headers["Content-Type"] == oci.headers["Content-Type"]
    # A client that takes an index alone gets one, of the instance's one platform.
    index = requests.get(url, headers={"Accept": "application/vnd.oci.image.index.v1+json"}, timeout=30)
    assert index.status_code == 200 and index.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert index.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(index.content).hexdigest()
    [entry] = index.json()["manifests"]
    assert entry["digest"] == oci.headers["Docker-Content-Digest"] and entry["mediaType"] == oci.headers["Content-Type"]
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}


def test_credentials_in_the_channel_url_never_reach_clients_or_logs(start_server):
    server = start_server({"NIXERY_CHANNEL": "nixos-unstable",
                           "NIXERY_CHANNEL_URL_TEMPLATE": "http://user:s3cret@127.0.0.1:9/{rev}.tar.gz"})
    response = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120)
    assert response.status_code == 500
    assert "127.0.0.1:9" in response.text and "s3cret" not in response.text
    assert "s3cret" not in server.log()
    assert "s3cret" not in requests.get(f"{server.url}/builds.json", timeout=10).text
    # A download that fails is the machine's or the network's: a 500, and the log says what to check.
    [failed] = [e for e in server.log_entries() if e.get("message") == "nix failed"]
    assert failed["action"].startswith("a download failed: check that this machine reaches the URL"), failed


def test_a_local_set_that_does_not_parse_is_a_500_whose_log_tells_the_operator(start_server, tmp_path):
    broken = tmp_path / "broken-set"
    broken.mkdir()
    (broken / "default.nix").write_text("{ ... }:\n{ hello = ; }\n")
    server = start_server({"NIXERY_PKGS_PATH": str(broken)})
    response = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=60)
    # The operator's to fix, and fixed in place at any time: not the request's fault.
    assert response.status_code == 500
    [error] = errors_of(response)
    assert "syntax error" in error["message"] and "(at default.nix:2:" in error["message"]
    [failed] = [e for e in server.log_entries() if e.get("message") == "nix failed"]
    assert failed["level"] == "ERROR" and "syntax error" in failed["nix_log"]
    assert failed["action"].startswith("the package set does not evaluate"), failed


def test_start_up_removes_what_dead_workers_left(start_server, pkgset, tmp_path):
    tmp = tmp_path / "shared" / "storage" / "tmp"
    tmp.mkdir(parents=True)
    # Named as this machine's worker 12345 names them; as new as can be, but its writer is gone.
    stale, fresh = tmp / f"{tmp_prefix(12345)}upload", tmp / f"{tmp_prefix(12346)}upload"
    stale.write_bytes(b"left by a killed worker a moment ago")
    fresh.write_bytes(b"another instance is writing this")
    state = tmp_path / "shared" / "state" / "gcroots"
    dead_worker_roots = state / "12345-0123abcd"
    dead_worker_roots.mkdir(parents=True)
    (dead_worker_roots / "out").symlink_to(pkgset)
    # An earlier version's build memo: a file per unpinned image built, never removed.
    memo = tmp_path / "shared" / "state" / "build-memo"
    memo.mkdir()
    (memo / ("0" * 64)).write_text("sha256:" + "1" * 64)
    # A Nix process of the killed instance, still running, as Nixery's records name it.
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (state / f"12345-nix-{orphan.pid}-{start_time(orphan.pid)}").touch()
    with open(fresh, "rb") as writing:
        fcntl.flock(writing, fcntl.LOCK_EX)  # as its writer holds it
        start_server({"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp.parent)}, workdir=tmp_path / "shared")
        assert not stale.exists() and fresh.exists()
    assert orphan.wait(timeout=10) == -signal.SIGTERM, "the Nix process of the killed instance was stopped"
    assert not dead_worker_roots.exists(), "GC roots of an earlier run pin store paths for good"
    assert not memo.exists()
