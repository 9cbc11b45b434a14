"""The fast tier: the HTTP layer in process — validation, errors, content negotiation, ranges, HEAD.

The app is the real one (`create_app`: the registry sink, error handlers,
middleware, metrics, web page and filesystem storage), driven through
`falcon.testing` with `StandInBuilder` in place of Nix, so these run in
milliseconds. Real clients pulling through Gunicorn stay in test_e2e.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nixery import web
from nixery.app import create_app
from nixery.config import Config, load
from nixery.storage.filesystem import FilesystemBackend
from support import StandInBuilder, errors_of

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclasses.dataclass
class Fast:
    client: falcon.testing.TestClient
    builder: StandInBuilder
    config: Config


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> Fast:
    """One app for the module: the tests only read, or compare before and after."""
    root = tmp_path_factory.mktemp("fast")
    (root / "pkgs").mkdir()
    config = load({"HOME": str(root), "STORAGE_PATH": str(root / "storage"), "NIXERY_STATE_DIR": str(root / "state"),
                   "NIXERY_PKGS_PATH": str(root / "pkgs")})
    storage = FilesystemBackend(config.storage_path)
    builder = StandInBuilder(storage, root)
    return Fast(falcon.testing.TestClient(create_app(config, storage, builder=builder)), builder, config)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_version_check(fast):
    response = fast.client.simulate_get("/v2/")
    assert response.status_code == 200 and response.json == {}
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert fast.client.simulate_head("/v2/").status_code == 200
    # Errors carry the header too: clients read it on every answer.
    missing = fast.client.simulate_get("/v2/hello/blobs/sha256:" + "0" * 64)
    assert missing.headers["Docker-Distribution-API-Version"] == "registry/2.0"


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
    ("/v2/Hello/tags/list", 400, "NAME_INVALID"),
    ("/v2/hello/tags/list?n=x", 400, "PAGINATION_NUMBER_INVALID"),
    ("/v2/hello/tags/lists", 404, "NOT_FOUND"),
])
def test_bad_requests_get_registry_errors(fast, path, status, code):
    # The path reaches the app as written: no dot segments resolved (Gunicorn does not either).
    response = fast.client.simulate_get(path)
    assert response.status_code == status, response.text
    [error] = errors_of(response)
    assert error["code"] == code


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/hello/blobs/uploads/"),
    ("PATCH", "/v2/hello/blobs/uploads/some-uuid"),
    ("PUT", "/v2/hello/blobs/uploads/some-uuid?digest=sha256:" + "0" * 64),
    ("PUT", "/v2/hello/manifests/latest"),
    ("DELETE", "/v2/hello/manifests/sha256:" + "0" * 64),
    ("DELETE", "/v2/hello/blobs/sha256:" + "0" * 64),
])
def test_push_and_delete_are_unsupported(fast, method, path):
    path, _, query = path.partition("?")
    response = fast.client.simulate_request(method, path, query_string=query, body=b"x")
    assert response.status_code == 405
    assert errors_of(response)[0]["code"] == "UNSUPPORTED"


def test_falcon_errors_are_registry_json_below_v2_and_text_elsewhere(fast):
    response = fast.client.simulate_post("/v2/")
    assert response.status_code == 405
    assert errors_of(response)[0]["code"] == "UNSUPPORTED"
    page = fast.client.simulate_post("/")
    assert page.status_code == 405 and page.headers["Content-Type"].startswith("text/plain")


def test_manifest_by_tag_by_digest_and_head(fast):
    response = fast.client.simulate_get("/v2/shell/hello/manifests/latest")
    assert response.status_code == 200 and response.headers["Content-Type"] == MANIFEST_V2
    digest = response.headers["Docker-Content-Digest"]
    assert digest == digest_of(response.content) == fast.builder.document.digest
    assert response.headers["ETag"] == f'"{digest}"'
    assert fast.builder.requests[-1].packages == ("bashInteractive", "coreutils", "hello", "moreutils", "nano")

    head = fast.client.simulate_head("/v2/shell/hello/manifests/latest")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Docker-Content-Digest"] == digest
    assert int(head.headers["Content-Length"]) == len(response.content)

    by_digest = fast.client.simulate_get(f"/v2/shell/hello/manifests/{digest}")
    assert by_digest.status_code == 200 and by_digest.content == response.content
    assert by_digest.headers["Content-Type"] == MANIFEST_V2 and by_digest.headers["ETag"] == f'"{digest}"'
    head_by_digest = fast.client.simulate_head(f"/v2/shell/hello/manifests/{digest}")
    assert head_by_digest.content == b"" and int(head_by_digest.headers["Content-Length"]) == len(response.content)


def test_only_manifests_are_served_as_manifests(fast):
    for descriptor in (fast.builder.config, fast.builder.layer):
        response = fast.client.simulate_get(f"/v2/hello/manifests/{descriptor.digest}")
        assert response.status_code == 404 and errors_of(response)[0]["code"] == "MANIFEST_UNKNOWN"


def test_oci_only_clients_get_the_oci_form_and_others_a_clear_404(fast):
    url = "/v2/hello/manifests/latest"
    docker = fast.client.simulate_get(url)
    oci = fast.client.simulate_get(url, headers={"Accept": OCI_MANIFEST})
    assert oci.status_code == 200
    assert oci.headers["Content-Type"] == OCI_MANIFEST
    assert oci.headers["Docker-Content-Digest"] == digest_of(oci.content)
    body = oci.json
    assert body["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {layer["mediaType"] for layer in body["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    # The same blobs as the Docker form, and fetchable again by its own digest.
    assert [layer["digest"] for layer in body["layers"]] == [layer["digest"] for layer in docker.json["layers"]]
    again = fast.client.simulate_get(f"/v2/hello/manifests/{oci.headers['Docker-Content-Digest']}")
    assert again.content == oci.content and again.headers["Content-Type"] == OCI_MANIFEST
    # Offered both, a client gets the Docker form; a wildcard means Docker too; offered neither, a clear 404.
    for accept in (f"{OCI_MANIFEST}, {MANIFEST_V2};q=0.9", "application/*", "*/*", ""):
        assert fast.client.simulate_get(url, headers={"Accept": accept}).headers["Content-Type"] == MANIFEST_V2
    response = fast.client.simulate_get(url, headers={"Accept": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
    assert response.status_code == 404
    assert MANIFEST_V2 in errors_of(response)[0]["message"]


def test_blob_endpoints(fast):
    layer = fast.builder.layer
    url = f"/v2/hello/blobs/{layer.digest}"

    head = fast.client.simulate_head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == layer.size
    assert head.headers["Docker-Content-Digest"] == layer.digest
    assert head.headers["Content-Type"] == layer.media_type
    assert head.headers["Accept-Ranges"] == "bytes" and head.headers["ETag"] == f'"{layer.digest}"'

    whole = fast.client.simulate_get(url)
    assert whole.status_code == 200 and digest_of(whole.content) == layer.digest

    part = fast.client.simulate_get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == whole.content[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{layer.size}"
    assert int(part.headers["Content-Length"]) == 10
    tail = fast.client.simulate_get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == whole.content[-5:]
    rest = fast.client.simulate_get(url, headers={"Range": "bytes=100-"})
    assert rest.status_code == 206 and rest.content == whole.content[100:]
    beyond = fast.client.simulate_get(url, headers={"Range": f"bytes=100-{layer.size * 2}"})
    assert beyond.status_code == 206 and beyond.content == whole.content[100:]
    head_part = fast.client.simulate_head(url, headers={"Range": "bytes=0-0"})
    assert head_part.status_code == 206 and head_part.content == b"" and head_part.headers["Content-Length"] == "1"

    config = fast.client.simulate_get(f"/v2/hello/blobs/{fast.builder.config.digest}")
    assert config.headers["Content-Type"] == "application/vnd.docker.container.image.v1+json"
    assert digest_of(config.content) == fast.builder.config.digest


def test_unsatisfiable_ranges_are_416_with_the_size(fast):
    layer = fast.builder.layer
    url = f"/v2/hello/blobs/{layer.digest}"
    for header in ("bytes=" + "9" * 5000 + "-", f"bytes={layer.size}-", f"bytes={layer.size}-{layer.size + 9}",
                   "bytes=-0", " bytes = 999999999-"):
        response = fast.client.simulate_get(url, headers={"Range": header})
        assert response.status_code == 416, header[:40]
        assert response.headers["Content-Range"] == f"bytes */{layer.size}"
        assert "Docker-Content-Digest" not in response.headers
        [error] = errors_of(response)
        assert error["code"] == "RANGE_INVALID" and error["detail"]["size"] == layer.size


def test_ranges_a_server_must_ignore_get_the_whole_blob(fast):
    """RFC 9110 section 14.2: an unknown unit or a malformed header is ignored, and several ranges
    may be answered with the whole representation (200, every byte, no Content-Range)."""
    layer = fast.builder.layer
    url = f"/v2/hello/blobs/{layer.digest}"
    for header in ("items=0-9", "bytes=5-3", "bytes=abc", "bytes=-", "bytes=0-1,5-6", "bytes=0-1, 5-",
                   "bytes 0-9", "=0-9", "bytes=1-2-3", "bytes=0x10-"):
        response = fast.client.simulate_get(url, headers={"Range": header})
        assert response.status_code == 200, header
        assert digest_of(response.content) == layer.digest, header
        assert "Content-Range" not in response.headers
        assert int(response.headers["Content-Length"]) == layer.size


def test_failures_of_the_build_steps_become_registry_errors_and_history(fast, caplog):
    caplog.set_level(logging.INFO, logger="nixery.history")
    unknown = fast.client.simulate_get("/v2/shell/hello/nosuchthing/nosuchother/manifests/latest")
    assert unknown.status_code == 404
    [error] = errors_of(unknown)
    assert error["code"] == "MANIFEST_UNKNOWN" and sorted(error["detail"]["unknown"]) == ["nosuchother", "nosuchthing"]
    assert error["message"] == "unknown packages: nosuchother, nosuchthing"

    # A build that fails will fail again: a 4xx, whose message registry clients print.
    broken = fast.client.simulate_get("/v2/broken/manifests/latest")
    assert broken.status_code == 422
    [error] = errors_of(broken)
    assert error == {"code": "UNKNOWN", "message": "broken failed to build: builder for broken failed with exit code 1"}
    assert "the whole log" not in broken.text, "Nix's log goes to the server log only"

    # Nix itself failing is the instance's fault: a 5xx.
    nix_down = fast.client.simulate_get("/v2/nix-down/manifests/latest")
    assert nix_down.status_code == 500
    assert errors_of(nix_down)[0] == {"code": "UNKNOWN", "message": "nix-store is not installed or not on PATH"}

    down = fast.client.simulate_get("/v2/storage-down/manifests/latest")
    assert down.status_code == 503
    assert errors_of(down)[0]["code"] == "UNAVAILABLE"
    assert errors_of(down)[0]["message"].startswith("storage failed: GCS bucket test: stat failed")

    crash = fast.client.simulate_get("/v2/crash/manifests/latest")
    assert crash.status_code == 500
    assert errors_of(crash)[0] == {"code": "UNKNOWN", "message": "internal error: KeyError"}

    # The build history records each with the words its client was given.
    history = fast.client.simulate_get("/builds.json").json["errors"]
    told = {item["image"]: (item["outcome"], item["reason"]) for item in history}
    assert told["shell/hello/nosuchthing/nosuchother"] == ("rejected", "unknown packages: nosuchother, nosuchthing")
    assert told["broken"] == ("failed", "broken failed to build: builder for broken failed with exit code 1")
    assert told["nix-down"] == ("failed", "nix-store is not installed or not on PATH")
    assert told["storage-down"][0] == "failed" and told["storage-down"][1].startswith("storage failed: ")
    assert told["crash"] == ("failed", "internal error: KeyError")

    # The log's line for each request whose client was told only "5xx" says what the operator should
    # do; a failure the client was told the reason of needs nothing from the operator.
    actions = {r.image: getattr(r, "action", None) for r in caplog.records if r.name == "nixery.history"}
    assert actions["nix-down"] == "install Nix, or put it on the service's PATH"
    assert actions["storage-down"].startswith("storage failed: check STORAGE_PATH's disk")
    assert actions["crash"].startswith("a fault of Nixery itself: report it")
    assert actions["broken"] is None and actions["shell/hello/nosuchthing/nosuchother"] is None


def scrape(fast) -> dict[tuple[str, tuple], float]:
    response = fast.client.simulate_get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_label_requests_by_route_template(fast):
    before = scrape(fast)
    layer = fast.builder.layer.digest
    for path in ("/v2/hello/manifests/latest", f"/v2/hello/blobs/{layer}", "/v2/hello/tags/lists", "/v2/",
                 "/nope", "/v2/nix-down/manifests/latest", "/v2/hello/tags/list"):
        fast.client.simulate_get(path)
    after = scrape(fast)

    def moved(route: str, status: str) -> float:
        key = ("nixery_http_requests_total", (("method", "GET"), ("route", route), ("status", status)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("/v2/{name}/manifests/{reference}", "200") == 1
    assert moved("/v2/{name}/manifests/{reference}", "500") == 1
    assert moved("/v2/{name}/blobs/{digest}", "200") == 1
    assert moved("/v2/{name}/tags/list", "200") == 1
    assert moved("/v2/{other}", "404") == 1
    assert moved("/v2", "200") == 1
    assert moved("{unmatched}", "404") == 1
    routes = {dict(labels).get("route") for (_, labels) in after} - {None}
    assert not any("hello" in route or "nix-down" in route for route in routes), routes
    builds = {outcome: after.get(("nixery_builds_total", (("outcome", outcome),)), 0.0)
              - before.get(("nixery_builds_total", (("outcome", outcome),)), 0.0) for outcome in ("built", "failed")}
    assert builds == {"built": 1, "failed": 1}


def test_page_names_the_requested_host_escaped(fast):
    page = fast.client.simulate_get("/", headers={"Host": "registry.example.org:5000"})
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "docker pull registry.example.org:5000/shell/git/htop" in page.text
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    behind_proxy = fast.client.simulate_get("/", headers={"X-Forwarded-Host": "nixery.internal"})
    assert "docker pull nixery.internal/shell/git/htop" in behind_proxy.text
    hostile = fast.client.simulate_get("/", headers={"Host": '<script>alert("x")</script>'})
    assert hostile.status_code == 200
    assert "<script" not in hostile.text and f"docker pull {web.PLACEHOLDER_HOST}/" in hostile.text
    # What this instance serves: its package source, storage and layer budget.
    assert "the package set in the directory" in page.text and "only the tag <code>latest</code>" in page.text
    assert "<code>filesystem</code>" in page.text and "94 layers per image" in page.text
    assert fast.client.simulate_head("/").content == b""


def test_static_files_and_not_found_pages(fast):
    css = fast.client.simulate_get("/static/style.css")
    assert css.status_code == 200 and css.headers["Content-Type"] == "text/css; charset=utf-8"
    assert "prefers-color-scheme" in css.text
    icon = fast.client.simulate_get("/static/favicon.svg")
    assert icon.headers["Content-Type"] == "image/svg+xml"
    for path in ("/nope", "/static/nope.css", "/static/page.html", "/v2x", "/index.html"):
        response = fast.client.simulate_get(path)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"] == "text/html; charset=utf-8", path
        assert "Nothing here" in response.text and "Pull an image" not in response.text, path
    marked = fast.client.simulate_get("/<b>x</b>")
    assert "<b>x</b>" not in marked.text and "&lt;b&gt;x&lt;/b&gt;" in marked.text
    registry = fast.client.simulate_get("/v2/hello/tags/lists")
    assert registry.status_code == 404 and errors_of(registry)[0]["code"] == "NOT_FOUND"


def test_tags_list_pages_through_the_sources_tags(tmp_path):
    """The distribution spec's tag listing, with `n` and `last`, over a channel source's tags."""
    config = load({"HOME": str(tmp_path), "STORAGE_PATH": str(tmp_path / "storage"),
                   "NIXERY_STATE_DIR": str(tmp_path / "state"), "NIXERY_CHANNEL": "nixos-unstable",
                   "NIXERY_CHANNEL_ALLOW": "nixos-24.05,nixos-24.11"})
    storage = FilesystemBackend(config.storage_path)
    client = falcon.testing.TestClient(create_app(config, storage, builder=StandInBuilder(storage, tmp_path)))
    every = client.simulate_get("/v2/shell/git/tags/list")
    assert every.status_code == 200 and every.headers["Content-Type"].startswith("application/json")
    assert every.json == {"name": "shell/git", "tags": ["latest", "nixos-24.05", "nixos-24.11"]}
    assert "Link" not in every.headers

    first = client.simulate_get("/v2/shell/git/tags/list", params={"n": "2"})
    assert first.json["tags"] == ["latest", "nixos-24.05"]
    assert first.headers["Link"] == '</v2/shell/git/tags/list?n=2&last=nixos-24.05>; rel="next"'
    rest = client.simulate_get("/v2/shell/git/tags/list", params={"n": "2", "last": "nixos-24.05"})
    assert rest.json["tags"] == ["nixos-24.11"] and "Link" not in rest.headers
    assert client.simulate_get("/v2/shell/git/tags/list", params={"n": "0"}).json["tags"] == []
    assert client.simulate_head("/v2/shell/git/tags/list").status_code == 200


def test_builds_json_lists_what_was_built(fast):
    fast.client.simulate_get("/v2/arm64/hello/manifests/v1-not-served")  # the stand-in serves every tag
    newest = fast.client.simulate_get("/builds.json").json["builds"][0]
    assert (newest["image"], newest["tag"], newest["outcome"]) == ("arm64/hello", "v1-not-served", "built")
    assert newest["layers"] == 1 and newest["size"] == fast.builder.layer.size
    assert json.loads(json.dumps(newest)) == newest


def test_one_platform_answers_a_list_client_with_a_manifest_and_referrers_with_an_index(fast):
    url = "/v2/hello/manifests/latest"
    listed = fast.client.simulate_get(url, headers={
        "Accept": f"application/vnd.docker.distribution.manifest.list.v2+json, {MANIFEST_V2}"})
    assert listed.headers["Content-Type"] == MANIFEST_V2  # one platform: no list to choose from
    referrers = fast.client.simulate_get(f"/v2/hello/referrers/{listed.headers['Docker-Content-Digest']}")
    assert referrers.status_code == 200
    assert referrers.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    (entry,) = referrers.json["manifests"]
    assert entry["artifactType"] == "application/spdx+json"
    artifact = fast.client.simulate_get(f"/v2/hello/manifests/{entry['digest']}", headers={"Accept": OCI_MANIFEST})
    assert artifact.status_code == 200 and digest_of(artifact.content) == entry["digest"]
    # A digest of another algorithm names nothing here: no referrers, not an error.
    other = fast.client.simulate_get(f"/v2/hello/referrers/sha512:{'a' * 128}")
    assert other.status_code == 200 and other.json["manifests"] == []
    assert fast.client.simulate_head(f"/v2/hello/referrers/{listed.headers['Docker-Content-Digest']}").status_code == 200
    page = fast.client.simulate_get("/").text
    assert "<code>nonroot</code>" in page and "referrers" in page
