"""Images that run anywhere (issue 13): users and groups, the non-root user, a multi-platform
index, history and labels naming what the image holds, and an SBOM through the referrers API.
Every check goes through a real client: skopeo, umoci and chroot."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from nixery.app import with_platforms
from nixery.config import ConfigError, load
from pkgset import including, make_emulated_package_set
from support import NIX_ENV, chroot_run, pull_and_unpack

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SPDX = "application/spdx+json"


# There is no aarch64 builder here: the emulated package set builds its aarch64 variant with this
# machine's builders, and Nix is told it may build for aarch64 (as an instance with an aarch64
# builder or qemu's binfmt would be), so that Nixery does not refuse arm64 before Nix runs.
CAN_BUILD_ARM64 = {"NIX_CONFIG": NIX_ENV["NIX_CONFIG"] + "\nextra-platforms = aarch64-linux"}

def skopeo(*args: str) -> str:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def inspect_config(host: str, name: str, *options: str) -> dict:
    return json.loads(skopeo(*options, "inspect", "--tls-verify=false", "--config", f"docker://{host}/{name}:latest"))


def chroot_as(rootfs: Path, userspec: str, script: str) -> subprocess.CompletedProcess:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    return subprocess.run([chroot, f"--userspec={userspec}", str(rootfs), "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/bin:/usr/bin", "HOME": "/home/nonroot"})


def get(server, path: str, accept: str = "") -> requests.Response:
    response = requests.get(f"{server.url}{path}", headers={"Accept": accept} if accept else {}, timeout=300)
    assert response.status_code == 200, response.text
    return response


def test_every_image_knows_its_users(shared_server, tmp_path):
    rootfs = pull_and_unpack(shared_server.host, "shell/hello", tmp_path)
    assert chroot_run(rootfs, "/bin/whoami") == "root\n"
    assert chroot_run(rootfs, "/bin/id") == "uid=0(root) gid=0(root)\n"
    assert "nobody:x:65534:65534:" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "etc/group").read_text() == "root:x:0:\nnobody:x:65534:\n"
    assert "passwd: files" in (rootfs / "etc/nsswitch.conf").read_text()
    assert (rootfs / "etc/shadow").read_text().startswith("root:!:")
    # nobody is known too: a program dropping privileges finds its name.
    assert chroot_as(rootfs, "65534:65534", "whoami").stdout == "nobody\n"


def test_nonroot_image_runs_as_an_unprivileged_user(shared_server, tmp_path):
    config = inspect_config(shared_server.host, "nonroot/shell/hello")
    assert config["config"]["User"] == "65532:65532"
    assert "HOME=/home/nonroot" in config["config"]["Env"]
    assert config["config"]["WorkingDir"] == "/home/nonroot"

    rootfs = pull_and_unpack(shared_server.host, "nonroot/shell/hello", tmp_path)
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh" in (rootfs / "etc/passwd").read_text()
    home = rootfs / "home/nonroot"
    assert (home.stat().st_uid, home.stat().st_gid) == (65532, 65532)
    run = chroot_as(rootfs, "65532:65532",
                    'id -u && whoami && echo hi > "$HOME/note" && cat "$HOME/note" && echo tmp > /tmp/t && cat /tmp/t')
    assert run.returncode == 0, run.stderr
    assert run.stdout == "65532\nnonroot\nhi\ntmp\n"
    # ... and cannot write where root's files are.
    denied = chroot_as(rootfs, "65532:65532", "echo x > /etc/evil")
    assert denied.returncode != 0
    # nonroot is part of the name's meaning, not a package: the same packages as root are another image.
    root = get(shared_server, "/v2/shell/hello/manifests/latest", MANIFEST_V2)
    nonroot = get(shared_server, "/v2/nonroot/shell/hello/manifests/latest", MANIFEST_V2)
    assert root.headers["Docker-Content-Digest"] != nonroot.headers["Docker-Content-Digest"]
    assert root.json()["layers"][:-1] == nonroot.json()["layers"][:-1], "only the root layer differs"


def test_config_history_names_store_paths_and_labels_the_packages(shared_server):
    config = inspect_config(shared_server.host, "shell/hello")
    manifest = get(shared_server, "/v2/shell/hello/manifests/latest", MANIFEST_V2).json()
    history = config["history"]
    assert len(history) == len(manifest["layers"]) == len(config["rootfs"]["diff_ids"])
    store_layers = [entry["created_by"] for entry in history[:-1]]
    assert all(text.startswith("/nix/store/") for text in store_layers)
    assert any(text.endswith("-hello") for text in store_layers)
    assert history[-1]["created_by"].startswith("nixery root layer")
    labels = config["config"]["Labels"]
    assert labels["dev.nixery.packages"] == "bashInteractive,coreutils,hello,moreutils,nano"
    # A local directory has no revision (and its path would differ between instances).
    assert "org.opencontainers.image.revision" not in labels


def test_labels_name_the_git_source_and_revision(start_server, pkgset, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(pkgset, work)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "packages"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    url = f"file://{work}"
    server = start_server({"NIXERY_PKGS_REPO": url})

    labels = inspect_config(server.host, "hello")["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == commit
    assert labels["org.opencontainers.image.source"] == url
    assert labels["dev.nixery.packages"] == "hello"


def test_sbom_is_listed_by_the_referrers_api_and_names_the_closure(shared_server, tmp_path):
    response = get(shared_server, "/v2/shell/greeter/manifests/latest", MANIFEST_V2)
    digest = response.headers["Docker-Content-Digest"]
    config_digest = response.json()["config"]["digest"]
    config = get(shared_server, f"/v2/shell/greeter/blobs/{config_digest}").json()
    closure = {p for entry in config["history"][:-1] for p in entry["created_by"].split()}
    assert any(p.endswith("-busybox") for p in closure) and any(p.endswith("-hello") for p in closure)

    referrers = get(shared_server, f"/v2/shell/greeter/referrers/{digest}")
    assert referrers.headers["Content-Type"] == OCI_INDEX
    (entry,) = referrers.json()["manifests"]
    assert entry["artifactType"] == SPDX and entry["mediaType"] == OCI_MANIFEST

    # The artifact, fetched as a client would: by digest, then its one layer.
    artifact_response = get(shared_server, f"/v2/shell/greeter/manifests/{entry['digest']}", OCI_MANIFEST)
    assert "sha256:" + hashlib.sha256(artifact_response.content).hexdigest() == entry["digest"]
    artifact = artifact_response.json()
    assert artifact["subject"] == {"mediaType": MANIFEST_V2, "digest": digest, "size": len(response.content)}
    (layer,) = artifact["layers"]
    sbom_response = get(shared_server, f"/v2/shell/greeter/blobs/{layer['digest']}")
    assert "sha256:" + hashlib.sha256(sbom_response.content).hexdigest() == layer["digest"]
    sbom = sbom_response.json()
    assert sbom["spdxVersion"] == "SPDX-2.3"
    assert {p["packageFileName"] for p in sbom["packages"]} == closure
    python = [p for p in sbom["packages"] if p["packageFileName"].endswith("-bash-interactive")]
    assert python and python[0]["name"] == "bash-interactive" and "versionInfo" not in python[0]

    # skopeo copies the artifact like any OCI manifest, by digest.
    skopeo("copy", "--src-tls-verify=false", f"docker://{shared_server.host}/shell/greeter@{entry['digest']}",
           f"oci:{tmp_path / 'sbom'}:sbom")

    # The same request again gives the same bytes; a filter on another type gives none; a
    # digest with no image is an empty index, not a 404 (the spec's rule).
    assert get(shared_server, f"/v2/shell/greeter/referrers/{digest}").content == referrers.content
    other = get(shared_server, f"/v2/shell/greeter/referrers/{digest}?artifactType=application/example")
    assert other.json()["manifests"] == [] and other.headers["OCI-Filters-Applied"] == "artifactType"
    assert get(shared_server, f"/v2/shell/greeter/referrers/sha256:{'0' * 64}").json()["manifests"] == []
    bad = requests.get(f"{shared_server.url}/v2/shell/greeter/referrers/sha256:xyz", timeout=30)
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID"


@pytest.fixture
def emulated(tmp_path, pkgset) -> Path:
    """There is no aarch64 builder here: this set's aarch64-linux variant is built by this
    machine (x86_64 busybox builders) and differs from the x86_64 one in every store path
    (tests/pkgset.py, make_emulated_package_set). It stands in for nixpkgs and a real builder."""
    return make_emulated_package_set(tmp_path / "emulated", pkgset)


def test_one_name_serves_every_platform(start_server, emulated, tmp_path):
    env = {"NIXERY_PKGS_PATH": str(emulated), "NIXERY_PLATFORMS": "linux/amd64,linux/arm64", **CAN_BUILD_ARM64}
    server = start_server(env)

    # A client that takes a manifest list gets one entry per platform.
    listed = get(server, "/v2/shell/hello/manifests/latest", f"{MANIFEST_LIST}, {MANIFEST_V2}")
    assert listed.headers["Content-Type"] == MANIFEST_LIST
    assert listed.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(listed.content).hexdigest()
    entries = listed.json()["manifests"]
    assert [e["platform"] for e in entries] == [{"architecture": "amd64", "os": "linux"},
                                                {"architecture": "arm64", "os": "linux"}]
    configs = {}
    for entry in entries:
        single = get(server, f"/v2/shell/hello/manifests/{entry['digest']}", MANIFEST_V2)
        assert single.headers["Content-Type"] == MANIFEST_V2 == entry["mediaType"]
        config = get(server, f"/v2/shell/hello/blobs/{single.json()['config']['digest']}").json()
        configs[entry["platform"]["architecture"]] = config
        assert config["architecture"] == entry["platform"]["architecture"]
    assert configs["amd64"]["rootfs"] != configs["arm64"]["rootfs"], "each platform has its own store paths"
    # The list itself can be fetched again by its digest.
    again = get(server, f"/v2/shell/hello/manifests/{listed.headers['Docker-Content-Digest']}", MANIFEST_LIST)
    assert again.content == listed.content

    # skopeo picks the matching manifest of the one name.
    for arch in ("amd64", "arm64"):
        config = inspect_config(server.host, "shell/hello", "--override-arch", arch)
        assert config["architecture"] == arch
        assert config["rootfs"] == configs[arch]["rootfs"]
    oci = tmp_path / "arm64-oci"
    skopeo("--override-arch", "arm64", "copy", "--src-tls-verify=false",
           f"docker://{server.host}/shell/hello:latest", f"oci:{oci}:latest")
    bundle = tmp_path / "arm64-bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{oci}:latest", str(bundle)], check=True, capture_output=True)
    # (the stand-in arm64 binaries are this machine's, so they run here)
    assert chroot_run(bundle / "rootfs", "/bin/hello") == "Hello, world!\n"

    # An OCI client gets an OCI index of OCI manifests; so does one that takes the index alone,
    # and a client that takes a Docker list alone gets the list.
    index = get(server, "/v2/shell/hello/manifests/latest", f"{OCI_INDEX}, {OCI_MANIFEST}")
    assert index.headers["Content-Type"] == OCI_INDEX
    assert {e["mediaType"] for e in index.json()["manifests"]} == {OCI_MANIFEST}
    index_only = get(server, "/v2/shell/hello/manifests/latest", OCI_INDEX)
    assert index_only.headers["Content-Type"] == OCI_INDEX and index_only.content == index.content
    list_only = get(server, "/v2/shell/hello/manifests/latest", MANIFEST_LIST)
    assert list_only.headers["Content-Type"] == MANIFEST_LIST and list_only.content == listed.content

    # A Docker-only client still gets one Docker manifest: the first platform listed, amd64.
    docker_only = get(server, "/v2/shell/hello/manifests/latest", MANIFEST_V2)
    assert docker_only.headers["Content-Type"] == MANIFEST_V2
    assert docker_only.headers["Docker-Content-Digest"] == entries[0]["digest"]
    # arm64/... names one platform, whatever the client takes.
    arm = get(server, "/v2/arm64/shell/hello/manifests/latest", f"{MANIFEST_LIST}, {MANIFEST_V2}")
    assert arm.headers["Content-Type"] == MANIFEST_V2
    assert arm.headers["Docker-Content-Digest"] == entries[1]["digest"]

    # Deterministic: another instance, with storage and state of its own, gives the same digests.
    other = start_server(env)
    relisted = get(other, "/v2/shell/hello/manifests/latest", f"{MANIFEST_LIST}, {MANIFEST_V2}")
    assert relisted.content == listed.content
    # ... and the same SBOM, artifact and document alike, made from the manifest alone.
    arm64 = entries[1]["digest"]
    referrers = [get(server_, f"/v2/shell/hello/referrers/{arm64}").json() for server_ in (server, other)]
    assert referrers[0] == referrers[1] and len(referrers[0]["manifests"]) == 1
    artifact = get(other, f"/v2/shell/hello/manifests/{referrers[1]['manifests'][0]['digest']}", OCI_MANIFEST).json()
    assert artifact["subject"]["digest"] == arm64


def test_a_platform_the_set_cannot_build_is_left_out_of_the_index(start_server, tmp_path, pkgset):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "default.nix").write_text(f"import {including(plain, pkgset)} {{ system = builtins.currentSystem; }}\n")
    server = start_server({"NIXERY_PKGS_PATH": str(plain), "NIXERY_PLATFORMS": "linux/amd64,linux/arm64",
                           **CAN_BUILD_ARM64})
    listed = get(server, "/v2/hello/manifests/latest", f"{MANIFEST_LIST}, {MANIFEST_V2}")
    assert [e["platform"]["architecture"] for e in listed.json()["manifests"]] == ["amd64"]


def test_nix_snapshotter_annotations_are_a_setting(start_server, pkgset, shared_server):
    server = start_server({"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_NIX_SNAPSHOTTER": "true"})
    raw = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{server.host}/hello:latest"))
    config = inspect_config(server.host, "hello")
    *store_layers, root_layer = raw["layers"]
    for layer, entry in zip(store_layers, config["history"]):
        notes = dict(layer["annotations"])
        assert notes.pop("containerd.io/snapshot/nix-layer") == "true"
        assert sorted(notes.values()) == entry["created_by"].split()
        assert set(notes) == {f"containerd.io/snapshot/nix-store-path.{i}" for i in range(len(notes))}
    assert "annotations" not in root_layer, "the root layer is unpacked as usual"
    # The OCI form carries them too; without the setting the same layers come without them.
    oci = get(server, "/v2/hello/manifests/latest", OCI_MANIFEST).json()
    assert [layer.get("annotations") for layer in oci["layers"]] == [layer.get("annotations") for layer in raw["layers"]]
    plain = get(shared_server, "/v2/hello/manifests/latest", MANIFEST_V2).json()
    assert [layer["digest"] for layer in plain["layers"]] == [layer["digest"] for layer in raw["layers"]]
    assert all("annotations" not in layer for layer in plain["layers"])


def test_default_platforms_are_what_nix_builds(tmp_path, monkeypatch, pkgset):
    config = load({"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(pkgset)})
    assert config.platforms == ()
    # This machine: x86_64-linux, with i686-linux and the x86_64-v* levels as extra platforms (not offered).
    assert with_platforms(config).platforms == ("linux/amd64",)
    monkeypatch.setenv("NIX_CONFIG", "extra-platforms = aarch64-linux i686-linux")
    assert with_platforms(config).platforms == ("linux/amd64", "linux/arm64")
    # A configured list is kept as it is, order and all.
    chosen = load({"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(pkgset), "NIXERY_PLATFORMS": "linux/arm64,linux/amd64"})
    assert with_platforms(chosen).platforms == ("linux/arm64", "linux/amd64")
    with pytest.raises(ConfigError, match="NIXERY_PLATFORMS names 'linux/s390x'"):
        load({"HOME": str(tmp_path), "NIXERY_PLATFORMS": "linux/amd64,linux/s390x"})


def test_the_first_platform_listed_is_the_single_manifest_clients_get(start_server, emulated):
    server = start_server({"NIXERY_PKGS_PATH": str(emulated), "NIXERY_PLATFORMS": "linux/arm64,linux/amd64",
                           **CAN_BUILD_ARM64})
    single = get(server, "/v2/hello/manifests/latest", MANIFEST_V2).json()
    assert get(server, f"/v2/hello/blobs/{single['config']['digest']}").json()["architecture"] == "arm64"
    listed = get(server, "/v2/hello/manifests/latest", f"{MANIFEST_LIST}, {MANIFEST_V2}").json()
    assert [e["platform"]["architecture"] for e in listed["manifests"]] == ["arm64", "amd64"]
