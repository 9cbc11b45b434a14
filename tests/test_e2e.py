"""End to end: the real server under Gunicorn, pulled by skopeo, unpacked by umoci, run in a chroot."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import time

import pytest
import requests

from conftest import chroot_run, oci_manifest, pull_and_unpack, skopeo_pull

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def server(start_server, pkgset):
    return start_server({"NIXERY_PKGS_PATH": str(pkgset)})


def errors_of(response: requests.Response) -> list[dict]:
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()["errors"]


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
    written = {layer["digest"]: (blobs / layer["digest"]).stat().st_mtime_ns for layer in hello["layers"]}
    greeter = requests.get(f"{server.url}/v2/shell/greeter/manifests/latest", timeout=120).json()
    hello_layers = {layer["digest"] for layer in hello["layers"]}
    greeter_layers = {layer["digest"] for layer in greeter["layers"]}
    shared = hello_layers & greeter_layers
    # Everything but the root layer is in both: each store path has a layer of its own (the
    # closures fit the layer budget), hello's included, so greeter's image reuses it.
    assert len(shared) == len(hello_layers) - 1, (hello_layers, greeter_layers)
    biggest = max(hello["layers"], key=lambda layer: layer["size"])
    assert biggest["digest"] in shared
    # The shared layers were found through their records, not archived again.
    assert {d: (blobs / d).stat().st_mtime_ns for d in shared} == {d: written[d] for d in shared}


def test_unknown_packages_are_404_naming_each(server):
    response = requests.get(f"{server.url}/v2/shell/hello/nosuchthing/alsomissing/manifests/latest", timeout=60)
    assert response.status_code == 404
    [error] = errors_of(response)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert sorted(error["detail"]["unknown"]) == ["alsomissing", "nosuchthing"]
    assert "nosuchthing" in error["message"] and "alsomissing" in error["message"]


def test_failing_build_is_500_with_a_short_reason(server):
    response = requests.get(f"{server.url}/v2/broken/manifests/latest", timeout=60)
    assert response.status_code == 500
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
    assert [r.status_code for r in responses] == [200] * 10
    assert len({r.headers["Docker-Content-Digest"] for r in responses}) == 1
    # One evaluation (nix-instantiate), whose derivations nix-store builds: the set is not evaluated again.
    assert nix_counter.count("nix-instantiate") == 1
    assert nix_counter.count("nix-store") == 1 and nix_counter.count("nix-build") == 0


def test_blob_endpoints(server):
    manifest = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).json()
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_url = f"{server.url}/v2/hello/blobs/{layer['digest']}"

    head = requests.head(blob_url, timeout=30)
    assert head.status_code == 200
    assert int(head.headers["Content-Length"]) == layer["size"]
    assert head.headers["Docker-Content-Digest"] == layer["digest"]
    assert head.headers["Content-Type"] == layer["mediaType"]

    whole = requests.get(blob_url, timeout=30)
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == layer["digest"]

    part = requests.get(blob_url, headers={"Range": "bytes=10-19"}, timeout=30)
    assert part.status_code == 206
    assert part.content == whole.content[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{layer['size']}"
    tail = requests.get(blob_url, headers={"Range": "bytes=-5"}, timeout=30)
    assert tail.status_code == 206 and tail.content == whole.content[-5:]
    bad = requests.get(blob_url, headers={"Range": f"bytes={layer['size']}-"}, timeout=30)
    assert bad.status_code == 416

    config = requests.get(f"{server.url}/v2/hello/blobs/{manifest['config']['digest']}", timeout=30)
    assert config.headers["Content-Type"] == "application/vnd.docker.container.image.v1+json"


@pytest.mark.parametrize("path, status, code", [
    ("/v2/hello/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("/v2/hello/blobs/sha512:" + "0" * 128, 404, "BLOB_UNKNOWN"),
    ("/v2/hello/blobs/sha256:../../etc/passwd", 404, "NOT_FOUND"),
    ("/v2/hello/blobs/sha256:%2e%2e%2f%2e%2e%2fstorage", 404, "NOT_FOUND"),
    ("/v2/hello/blobs/sha256:..", 400, "DIGEST_INVALID"),
    ("/v2/hello/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("/v2/hello/blobs/notadigest", 400, "DIGEST_INVALID"),
    ("/v2/hello/manifests/sha256:" + "1" * 64, 404, "MANIFEST_UNKNOWN"),
    ("/v2/hello/manifests/sha256:XYZ!", 400, "DIGEST_INVALID"),
    ("/v2/Hello/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/../etc/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/hello/manifests/.bad", 400, "TAG_INVALID"),
    ("/v2/hello/tags/list", 404, "NOT_FOUND"),
])
def test_bad_requests_get_registry_errors(server, path, status, code):
    # http.client sends the path as written (requests would resolve the dot segments).
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    assert response.status == status, body
    assert response.getheader("Content-Type").startswith("application/json")
    [error] = json.loads(body)["errors"]
    assert error["code"] == code


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/hello/blobs/uploads/"),
    ("PATCH", "/v2/hello/blobs/uploads/some-uuid"),
    ("PUT", "/v2/hello/blobs/uploads/some-uuid?digest=sha256:" + "0" * 64),
    ("PUT", "/v2/hello/manifests/latest"),
    ("DELETE", "/v2/hello/manifests/sha256:" + "0" * 64),
    ("DELETE", "/v2/hello/blobs/sha256:" + "0" * 64),
])
def test_push_and_delete_are_unsupported(server, method, path):
    response = requests.request(method, server.url + path, data=b"x", timeout=30)
    assert response.status_code == 405
    assert errors_of(response)[0]["code"] == "UNSUPPORTED"


def test_version_check(server):
    response = requests.get(server.url + "/v2/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert requests.head(server.url + "/v2/", timeout=10).status_code == 200


def test_nix_timeout_is_a_500_and_kills_the_build(start_server, tmp_path):
    from pkgset import make_package_set
    import uuid
    slow = make_package_set(tmp_path / "slow-set", salt=uuid.uuid4().hex[:12], slow_seconds=117)
    server = start_server({"NIXERY_PKGS_PATH": str(slow), "NIX_TIMEOUT": "3"})
    started = time.monotonic()
    response = requests.get(f"{server.url}/v2/slowbuild/manifests/latest", timeout=60)
    assert time.monotonic() - started < 30
    assert response.status_code == 500
    [error] = errors_of(response)
    assert error["code"] == "UNKNOWN" and "timed out after 3s" in error["message"]
    time.sleep(1)
    for pattern in (str(slow), "sleep 117"):  # the evaluation, and the builder in its own session
        leftovers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert leftovers == [], f"{pattern} survived the timeout"
    # The server is still there for the next request.
    assert requests.get(f"{server.url}/v2/", timeout=10).status_code == 200


def test_start_up_logs_the_configuration_without_secrets(start_server, pkgset):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_GIT_TOKEN": "very-secret-token"})
    [start] = [e for e in server.log_entries() if e.get("message") == "starting nixery"]
    assert start["config"]["source"] == {"kind": "path", "argument": str(pkgset.resolve())}
    assert start["config"]["layer_budget"] == 94 and start["config"]["git_token"] == "<set>"
    assert "very-secret-token" not in server.log()


def test_only_manifests_are_served_as_manifests(server):
    manifest = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).json()
    for digest in (manifest["config"]["digest"], manifest["layers"][0]["digest"]):
        response = requests.get(f"{server.url}/v2/hello/manifests/{digest}", timeout=30)
        assert response.status_code == 404 and errors_of(response)[0]["code"] == "MANIFEST_UNKNOWN"


def test_oci_only_clients_get_the_oci_form_and_others_a_clear_404(server):
    url = f"{server.url}/v2/hello/manifests/latest"
    docker = requests.get(url, timeout=120)
    oci = requests.get(url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=120)
    assert oci.status_code == 200
    assert oci.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    assert oci.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(oci.content).hexdigest()
    body = oci.json()
    assert body["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {layer["mediaType"] for layer in body["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    # The same blobs as the Docker form, and fetchable again by its own digest.
    assert [layer["digest"] for layer in body["layers"]] == [layer["digest"] for layer in docker.json()["layers"]]
    again = requests.get(f"{server.url}/v2/hello/manifests/{oci.headers['Docker-Content-Digest']}", timeout=30)
    assert again.content == oci.content and again.headers["Content-Type"] == oci.headers["Content-Type"]
    # Offered both, a client gets the Docker form; offered neither, a clear 404.
    both = {"Accept": f"application/vnd.oci.image.manifest.v1+json, {MANIFEST_V2};q=0.9"}
    assert requests.get(url, headers=both, timeout=120).headers["Content-Type"] == MANIFEST_V2
    schema1 = {"Accept": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    response = requests.get(url, headers=schema1, timeout=120)
    assert response.status_code == 404
    assert MANIFEST_V2 in errors_of(response)[0]["message"]


def test_unsatisfiable_ranges_are_416_with_the_size(server):
    manifest = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).json()
    layer = manifest["layers"][0]
    url = f"{server.url}/v2/hello/blobs/{layer['digest']}"
    for header in ("bytes=" + "9" * 5000 + "-", "bytes=abc", f"bytes={layer['size']}-"):
        response = requests.get(url, headers={"Range": header}, timeout=30)
        assert response.status_code == 416, header[:40]
        assert response.headers["Content-Range"] == f"bytes */{layer['size']}"
        assert "Docker-Content-Digest" not in response.headers
        assert errors_of(response)[0]["code"] == "RANGE_INVALID"


def test_falcon_errors_below_v2_are_registry_json(server):
    response = requests.post(f"{server.url}/v2/", timeout=10)
    assert response.status_code == 405
    assert errors_of(response)[0]["code"] == "UNSUPPORTED"


def test_credentials_in_the_channel_url_never_reach_clients_or_logs(start_server):
    server = start_server({"NIXERY_CHANNEL": "nixos-unstable",
                           "NIXERY_CHANNEL_URL_TEMPLATE": "http://user:s3cret@127.0.0.1:9/{rev}.tar.gz"})
    response = requests.get(f"{server.url}/v2/hello/manifests/latest", timeout=120)
    assert response.status_code == 500
    assert "127.0.0.1:9" in response.text and "s3cret" not in response.text
    assert "s3cret" not in server.log()
    assert "s3cret" not in requests.get(f"{server.url}/builds.json", timeout=10).text


def test_start_up_removes_what_dead_workers_left(start_server, pkgset, tmp_path):
    tmp = tmp_path / "shared" / "storage" / "tmp"
    tmp.mkdir(parents=True)
    stale, fresh = tmp / "stale-upload", tmp / "fresh-upload"
    stale.write_bytes(b"left by a killed worker")
    fresh.write_bytes(b"another instance is writing this")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    dead_worker_roots = tmp_path / "shared" / "state" / "gcroots" / "12345-0123abcd"
    dead_worker_roots.mkdir(parents=True)
    (dead_worker_roots / "out").symlink_to(pkgset)
    start_server({"NIXERY_PKGS_PATH": str(pkgset), "STORAGE_PATH": str(tmp.parent)}, workdir=tmp_path / "shared")
    assert not stale.exists() and fresh.exists()
    assert not dead_worker_roots.exists(), "GC roots of an earlier run pin store paths for good"
