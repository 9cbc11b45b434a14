"""Declared images: a package set's nixery-images.nix names images with their packages and config.

A git repository of two tags declares `web` differently; Docker pulls each tag from a real
server, `docker inspect` shows the declared config and `docker run` runs the declared command
as the declared user. The declarations' checks run on the raw data Nix hands over.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from containers import ensure_dockerd
from pkgset import make_package_set
from support import Server, chroot_run, pull_and_unpack
from nixery import declared, image, rootfs
from nixery.error_handlers import as_registry_error

SALT = "declared-test"
# A package of the set named like the declared image: the declared name wins.
WEB_PACKAGE = 'web = script "web" "echo the-web-package";'


def declarations(version: str, user: str) -> str:
    return f'''{{ pkgs, ... }}: {{
  web = {{
    packages = [ "busybox" "coreutils" "hello" ];
    Cmd = [ "sh" "-c" "echo uid=$(id -u) user=$(whoami 2>/dev/null || echo none) dir=$(pwd); echo $GREETING; hello" ];
    Env = {{ GREETING = "hi from {version}"; }};
    ExposedPorts = [ 8080 "53/udp" ];
    User = "{user}";
    Labels = {{ "org.example.version" = "{version}"; }};
    description = "the {version} web image";
  }};
  bad = {{ packages = [ "hello" ]; Env = {{ GREETING = x: x; }}; }};
  typo = {{ packages = [ "hello" ]; Comand = [ "hello" ]; }};
  Upper = {{ packages = [ "hello" ]; }};
  drv = {{ packages = [ pkgs.hello ]; }};
  typos = {{ packages = [ "helo" "coreutils" ]; }};
  shown = {{ packages = [ "hello" ]; description = "<script>alert(1)</script>"; }};
  snoop = {{ packages = [ "hello" ]; Env = {{ S = builtins.readFile /etc/hostname; }}; }};
}}
'''


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """v1 declares `web` running as nonroot, v2 as numeric ids with another greeting (main is v2)."""
    work = tmp_path_factory.mktemp("declared") / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    make_package_set(work, salt=SALT)
    nix = work / "default.nix"
    nix.write_text(nix.read_text().replace("in rec {", "in rec {\n  " + WEB_PACKAGE, 1))
    for version, user in (("v1", "nonroot"), ("v2", "1234:1234")):
        (work / "nixery-images.nix").write_text(declarations(version, user))
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", version)
        git(work, "tag", version)
    return work


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("declared-server"), {"NIXERY_PKGS_REPO": f"file://{repo}"}).start()
    yield started
    started.stop()


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def pulled(server):
    """Docker pulls of the server's images by reference; removed afterwards."""
    ensure_dockerd()
    refs: list[str] = []

    def pull(name: str, tag: str) -> str:
        ref = f"{server.host}/{name}:{tag}"
        docker("pull", "-q", ref)
        refs.append(ref)
        return ref

    yield pull
    subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True)


def inspect(ref: str) -> dict:
    return json.loads(docker("inspect", ref))[0]["Config"]


def test_docker_runs_the_declared_command_as_the_declared_user(pulled):
    ref = pulled("web", "v1")
    config = inspect(ref)
    assert config["Cmd"][:2] == ["sh", "-c"] and config["User"] == "65532:65532"
    assert "GREETING=hi from v1" in config["Env"] and "HOME=/home/nonroot" in config["Env"]
    assert config["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert config["Labels"]["org.example.version"] == "v1"
    assert config["Labels"]["dev.nixery.packages"] == "busybox,coreutils,hello"
    name = f"nixery-declared-{uuid.uuid4().hex[:8]}"
    output = docker("run", "--rm", "--name", name, ref)
    assert output.splitlines() == ["uid=65532 user=nonroot dir=/home/nonroot", "hi from v1", "Hello, world!"]


def test_a_new_tag_serves_its_own_declaration(pulled):
    ref = pulled("web", "v2")
    config = inspect(ref)
    assert config["User"] == "1234:1234" and "GREETING=hi from v2" in config["Env"]
    assert not any(e.startswith("HOME=") for e in config["Env"]), "numeric ids have no account, so no home"
    output = docker("run", "--rm", ref)
    assert output.splitlines() == ["uid=1234 user=none dir=/", "hi from v2", "Hello, world!"]


def test_declared_name_wins_over_the_package_which_other_names_still_reach(server, tmp_path):
    for part in ("declared", "plain"):
        (tmp_path / part).mkdir()
    declared_root = pull_and_unpack(server.host, "web", tmp_path / "declared", "v1")
    assert (declared_root / "bin/hello").exists() and not (declared_root / "bin/web").exists()
    plain_root = pull_and_unpack(server.host, "web/coreutils", tmp_path / "plain", "v1")
    assert chroot_run(plain_root, "/bin/web").strip() == "the-web-package"


@pytest.mark.parametrize("name, field, words", [
    ("bad", "Env.GREETING", "must be a string, not a function"),
    ("typo", "Comand", "is not a field of a declared image"),
])
def test_invalid_declarations_are_4xx_naming_image_and_field(server, name, field, words):
    response = requests.get(f"{server.url}/v2/{name}/manifests/v1", timeout=120)
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_INVALID" and error["detail"] == {"image": name, "field": field}
    assert f"image {name}" in error["message"] and words in error["message"]


def test_unknown_packages_of_a_declaration_say_so(server):
    response = requests.get(f"{server.url}/v2/typos/manifests/v1", timeout=120)
    assert response.status_code == 404, response.text
    error = response.json()["errors"][0]
    assert error["detail"]["unknown"] == ["helo"] and error["detail"]["image"] == "typos"
    assert "helo (did you mean hello?)" in error["message"] and "declaration of image typos" in error["message"]


def test_declarations_are_evaluated_confined(server):
    """A declaration is the set's code, which a tag chooses: it reads no file of the server's."""
    response = requests.get(f"{server.url}/v2/snoop/manifests/v1", timeout=120)
    assert response.status_code == 403, response.text
    assert "restricted mode" in response.json()["errors"][0]["message"]
    assert Path("/etc/hostname").read_text().strip() not in response.text


def test_page_and_json_list_the_declared_images_of_latest(server):
    listing = requests.get(f"{server.url}/declared.json", timeout=60).json()
    by_name = {i["name"]: i for i in listing["images"]}
    assert by_name["web"] == {"name": "web", "packages": ["busybox", "coreutils", "hello"],
                              "description": "the v2 web image"}
    assert "not a valid image name" in by_name["Upper"]["error"]
    assert "packages[0]: is a derivation, not a name" in by_name["drv"]["error"]
    assert len(listing["revision"]) == 40
    search = requests.get(f"{server.url}/packages.json", params={"q": "WE"}, timeout=60).json()
    assert search["images"] == [by_name["web"]]
    assert not requests.get(f"{server.url}/packages.json", params={"q": "nosuchimage"}, timeout=60).json()["images"]
    page = requests.get(server.url + "/", timeout=60).text
    assert "<code>web</code>" in page and "the v2 web image" in page and "wins over a package" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_an_image_of_one_package_runs_its_main_program(server, pulled):
    manifest = requests.get(f"{server.url}/v2/hello/manifests/v1", timeout=120).json()
    assert requests.get(f"{server.url}/v2/hello/blobs/{manifest['config']['digest']}").json()["config"]["Cmd"] == ["hello"]
    assert docker("run", "--rm", pulled("hello", "v1")).strip() == "Hello, world!"
    for name, cmd in (("mislabelled", None), ("shell/hello", ["bash"]), ("hello/coreutils", None)):
        manifest = requests.get(f"{server.url}/v2/{name}/manifests/v1", timeout=120).json()
        config = requests.get(f"{server.url}/v2/{name}/blobs/{manifest['config']['digest']}").json()["config"]
        assert config.get("Cmd") == cmd, name


# ----------------------------------------------------------- checks without Nix --

def test_only_a_single_plain_name_may_be_declared():
    assert image.parse("web", "latest").declarable == "web"
    assert image.parse("arm64/web", "latest").declarable == "web"
    for name in ("web/web", "shell", "nonroot/web", "shell/web", "web/curl"):
        assert image.parse(name, "latest").declarable == "", name
    # `web/web` asks for the package web; `web` may be the declared image: never one cache entry.
    assert image.parse("web", "latest").key != image.parse("web/web", "latest").key
    assert image.parse("git/htop", "latest").key == image.parse("htop/git", "latest").key


def told(raw: object) -> tuple[int, dict, str]:
    with pytest.raises(declared.InvalidDeclaration) as raised:
        declared.parse("web", raw)
    error = as_registry_error(raised.value)
    return error.status, error.detail, error.message


@pytest.mark.parametrize("raw, field, words", [
    ([], "declaration", "must be an attribute set, not a list"),
    ({"Cmd": ["x"]}, "packages", "is missing"),
    ({"packages": []}, "packages", "is empty"),
    ({"packages": "hello"}, "packages", "must be a list, not a string"),
    ({"packages": [{"__invalid": "a derivation"}]}, "packages[0]", "is a derivation, not a name"),
    ({"packages": ["../etc"]}, "packages[0]", "is not a package name"),
    ({"packages": ["a"], "Cmd": "hello"}, "Cmd", "must be a list, not a string"),
    ({"packages": ["a"], "Cmd": ["a", 1]}, "Cmd[1]", "must be a string, not a number"),
    ({"packages": ["a"], "Cmd": ["x" * 5000]}, "Cmd[0]", "more than 4096"),
    ({"packages": ["a"], "Cmd": ["x"] * 300}, "Cmd", "more than 256"),
    ({"packages": ["a"], "Entrypoint": ["a\0b"]}, "Entrypoint[0]", "NUL"),
    ({"packages": ["a"], "Env": ["A=b"]}, "Env", "must be an attribute set, not a list"),
    ({"packages": ["a"], "Env": {"A=B": "c"}}, "Env.A=B", "not a valid variable name"),
    ({"packages": ["a"], "Env": {"A": {"__invalid": "throws"}}}, "Env.A", "not throws"),
    ({"packages": ["a"], "WorkingDir": "srv"}, "WorkingDir", "not an absolute path"),
    ({"packages": ["a"], "User": "www-data"}, "User", "neither root, nonroot nor numeric"),
    ({"packages": ["a"], "User": 1000}, "User", "must be a string"),
    ({"packages": ["a"], "ExposedPorts": ["80/ftp"]}, "ExposedPorts[0]", "is not a port"),
    ({"packages": ["a"], "ExposedPorts": [70000]}, "ExposedPorts[0]", "is not a port"),
    ({"packages": ["a"], "ExposedPorts": [True]}, "ExposedPorts[0]", "must be a string"),
    ({"packages": ["a"], "Labels": {"org.opencontainers.image.revision": "forged"}},
     "Labels.org.opencontainers.image.revision", "set by Nixery itself"),
    ({"packages": ["a"], "Volumes": {}}, "Volumes", "is not a field"),
    # The set's own words in a message are cut short (a message is kept, logged and sent).
    ({"packages": ["a"], "V" * 100_000: {}}, "V" * 100, "is not a field"),
    ({"packages": ["a"], "Cmd": {"__invalid": "W" * 100_000}}, "Cmd", "must be a list, not " + "W" * 100 + ""),
    ({"packages": ["a"], "Env": {f"V{i:03d}": "x" * 4000 for i in range(100)}}, "Env.V065", "more than 262144 bytes"),
])
def test_each_invalid_field_is_named(raw, field, words):
    status, detail, message = told(raw)
    assert status == 422 and detail == {"image": "web", "field": field}
    assert words in message and "image web" in message and len(message) < 600, message[:600]


def test_a_valid_declaration_becomes_the_image_config():
    declaration = declared.parse("web", {
        "packages": ["nginx", "coreutils", "nginx"], "Cmd": ["nginx", "-g", "daemon off;"], "Entrypoint": ["tini"],
        "Env": {"B": "2", "PATH": "/bin"}, "WorkingDir": "/srv", "User": "nonroot",
        "ExposedPorts": ["443", 80, "53/udp", "80/tcp"], "Labels": {"org.example.a": "b"}, "description": "d"})
    assert declaration.packages == ("nginx", "coreutils") and declaration.user is rootfs.NONROOT
    assert declaration.ports == ("443/tcp", "53/udp", "80/tcp")
    run = declared.run_config(declaration)
    assert run.cmd == ("nginx", "-g", "daemon off;") and run.env == ("B=2", "PATH=/bin") and run.user == ""
    assert declared.parse("web", {"packages": ["a"], "User": "root"}).user is None
    assert declared.parse("web", {"packages": ["a"], "User": "10:20"}).user == "10:20"


def test_listing_marks_what_cannot_be_pulled():
    listed = declared.listing({"images": {"web": {"packages": ["a"], "description": "x"}, "shell": {"packages": ["a"]},
                                          "team/web": {"packages": ["a"]}, "empty": {"packages": []},
                                          "fn": {"__invalid": "a function"}}})
    by_name = {entry.name: entry for entry in listed}
    assert by_name["web"] == declared.Listed("web", ("a",), "x")
    assert "meta-package" in by_name["shell"].error and "valid image name" in by_name["team/web"].error
    assert "is empty" in by_name["empty"].error and "not a function" in by_name["fn"].error
    assert declared.listing({"error": "nixery-images.nix does not evaluate to an attribute set"})[0].error
