"""Package sources: git repositories, channel tarballs and local paths, and the manifest cache.

Every repository and tarball is made here: a package set per revision, each
with a `marker` that prints the revision's label and a `<label>only` package
that no other revision has, so an image shows which revision built it.
"""

from __future__ import annotations

import base64
import json
import concurrent.futures
import dataclasses
import functools
import http.server
import os
import re
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pygit2
import pytest
import requests
from pygit2.enums import CredentialType

from pkgset import make_package_set
from support import chroot_run, pull_and_unpack
from nixery.config import StateLayout
from nixery.error_handlers import as_registry_error
from nixery.errors import RegistryError
from nixery.sources.channel import ChannelSource
from nixery.sources.git import GitSettings, GitSource, _Credentials
from nixery.sources.path import PathSource

SALT = "sources-test"
TOKEN = "s3cret-token-never-logged"


def write_revision(directory: Path, label: str) -> Path:
    """The shared test package set plus this revision's `marker` and `<label>only`."""
    make_package_set(directory, salt=SALT)
    nix = directory / "default.nix"
    nix.write_text(nix.read_text().replace("in rec {", f'in rec {{\n  marker = script "marker" "echo {label}";\n'
                                           f'  {label}only = script "{label}only" "echo {label}";', 1))
    return directory


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(cwd), "-c", "user.name=test", "-c", "user.email=test@example.com",
                             *args], capture_output=True, text=True, check=True)
    return result.stdout.strip()


@dataclasses.dataclass
class Repo:
    work: Path
    bare: Path
    commits: dict[str, str]

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def commit(self, label: str) -> str:
        """Commits revision `label` on the work tree's branch and returns the commit."""
        write_revision(self.work, label)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", label)
        self.commits[label] = git(self.work, "rev-parse", "HEAD")
        return self.commits[label]

    def clone(self, directory: Path) -> "Repo":
        """A copy of the bare repository with its own work tree, for a test that pushes."""
        bare = directory / "clone.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(self.bare), str(bare)], check=True)
        work = directory / "clone-work"
        subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
        return Repo(work, bare, dict(self.commits))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """Three commits: release-v1 (a tag) on `one`, release-v2 (a branch) on `two`, main ahead at `three`."""
    root = tmp_path_factory.mktemp("git")
    work = root / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    made = Repo(work, root / "packages.git", {})
    made.commit("one")
    git(work, "tag", "-a", "-m", "first release", "release-v1")
    made.commit("two")
    git(work, "branch", "release-v2")
    made.commit("three")
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(made.bare)], check=True)
    return made


def manifest(server, name: str, tag: str) -> requests.Response:
    return requests.get(f"{server.url}/v2/{name}/manifests/{tag}", timeout=120)


def error_of(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["errors"][0]


def marker_of(server, tag: str, workdir: Path) -> str:
    """Pulls `marker` at `tag` with skopeo, unpacks it with umoci and runs it in a chroot."""
    (workdir / tag).mkdir(parents=True)
    rootfs = pull_and_unpack(server.host, "marker", workdir / tag, tag)
    return chroot_run(rootfs, "/bin/marker").strip()


# --------------------------------------------------------------------- git --

def test_git_tags_build_their_own_revisions(start_server, repo, nix_counter, tmp_path):
    server = start_server({"NIXERY_PKGS_REPO": repo.url, "PATH": nix_counter.path()})
    cases = {"latest": "three", "release-v1": "one", "release-v2": "two", repo.commits["two"]: "two"}
    for tag, label in cases.items():
        assert marker_of(server, tag, tmp_path) == label
        assert manifest(server, f"{label}only", tag).status_code == 200
        other = next(o for o in ("one", "two", "three") if o != label)
        missing = manifest(server, f"{other}only", tag)
        assert missing.status_code == 404 and error_of(missing)["detail"]["unknown"] == [f"{other}only"]

    for tag in ("release-v9", "0" * 40, "bad..ref"):
        response = manifest(server, "marker", tag)
        assert response.status_code == 404, tag
        assert error_of(response)["code"] == "MANIFEST_UNKNOWN"
        assert error_of(response)["detail"] == {"tag": tag} and tag in error_of(response)["message"]


def test_pinned_image_is_served_again_without_nix(start_server, repo, nix_counter, tmp_path):
    server = start_server({"NIXERY_PKGS_REPO": repo.url, "PATH": nix_counter.path()})
    nix_counter.reset()
    assert marker_of(server, repo.commits["one"], tmp_path / "first") == "one"
    assert nix_counter.count() > 0
    before = nix_counter.count()
    start = time.monotonic()
    assert marker_of(server, repo.commits["one"], tmp_path / "second") == "one"
    elapsed = time.monotonic() - start
    # release-v1 is the same commit: once the revision is fixed, the tag does not matter.
    assert marker_of(server, "release-v1", tmp_path / "by-tag") == "one"
    assert nix_counter.count() == before, "a pinned image must be served without running Nix"
    print(f"second pull of a pinned image (skopeo + umoci + chroot): {elapsed:.2f}s")
    # The export happened once, keyed by the commit.
    checkouts = list((server.workdir / "state" / "git").glob("*/checkouts/*"))
    assert [c.name for c in checkouts] == [repo.commits["one"]]


def test_new_commit_on_default_branch_is_served_after_the_ttl(start_server, repo, tmp_path):
    ttl = 3
    moving = repo.clone(tmp_path)
    server = start_server({"NIXERY_PKGS_REPO": moving.url, "NIXERY_GIT_TTL": str(ttl)})
    assert manifest(server, "threeonly", "latest").status_code == 200
    # An unknown tag forces a fetch now, so the push below lands inside a fresh TTL.
    before_fetch = time.monotonic()
    assert manifest(server, "marker", "not-yet").status_code == 404
    moving.commit("four")
    git(moving.work, "push", "-q", "origin", "HEAD:main")
    assert manifest(server, "fouronly", "latest").status_code == 404, "fetched again before the TTL"
    # Asked again (instead of sleeping out the TTL) until the branch is fetched again.
    while (answer := manifest(server, "fouronly", "latest").status_code) == 404:
        assert time.monotonic() - before_fetch < ttl + 30, "not fetched again after the TTL"
        time.sleep(0.1)
    assert answer == 200
    assert marker_of(server, "latest", tmp_path) == "four"


def test_two_servers_share_the_manifest_cache(start_server, repo, nix_counter, tmp_path):
    storage = str(tmp_path / "shared-storage")
    first = start_server({"NIXERY_PKGS_REPO": repo.url, "STORAGE_PATH": storage})
    second = start_server({"NIXERY_PKGS_REPO": repo.url, "STORAGE_PATH": storage, "PATH": nix_counter.path()})
    nix_counter.reset()
    assert first.workdir != second.workdir
    assert marker_of(first, repo.commits["three"], tmp_path / "first") == "three"
    assert marker_of(second, repo.commits["three"], tmp_path / "second") == "three"
    assert nix_counter.count() == 0, "the second server must answer from the shared storage"
    assert not list((second.workdir / "state" / "git").glob("*/checkouts/*")), "nothing to export either"


def test_checkouts_are_exported_once_and_unused_ones_pruned(repo, tmp_path):
    source = git_source(repo.url, tmp_path, None)
    first = Path(source.resolve("release-v1").args.argument)
    assert first.name == repo.commits["one"] and (first / "busybox-static/bin/busybox").stat().st_mode & 0o111
    assert Path(source.resolve(repo.commits["one"]).args.argument) == first
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(first, (week_ago, week_ago))
    second = Path(source.resolve("latest").args.argument)
    assert second.name == repo.commits["three"] and not first.exists()


# ------------------------------------------------ git over https with a token --

class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


class GitHttpServer:
    """`git http-backend` behind HTTP basic authentication: a private https-style remote.

    Counts the fetches it serves (one `info/refs` request each) and can be
    slowed down, so that concurrent requests overlap one fetch."""

    def __init__(self, root: Path, token: str, delay: float = 0.0):
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
        self.delay = delay
        self.fetches = 0
        self.server = make_server("127.0.0.1", 0, self.app, handler_class=_QuietHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}"

    def app(self, environ, start_response):
        if environ.get("HTTP_AUTHORIZATION") != self.expected:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Length", "0")])
            return [b""]
        if environ["PATH_INFO"].endswith("/info/refs"):
            self.fetches += 1
            time.sleep(self.delay)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        env = {"GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_USER": "x-access-token",
               "CONTENT_LENGTH": str(length), "GIT_PROTOCOL": environ.get("HTTP_GIT_PROTOCOL", ""),
               **{key: environ.get(key, "") for key in ("PATH_INFO", "QUERY_STRING", "REQUEST_METHOD",
                                                         "CONTENT_TYPE")}}
        out = subprocess.run(["git", "http-backend"], input=environ["wsgi.input"].read(length), env=env,
                             capture_output=True, check=True).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        headers = [tuple(line.split(": ", 1)) for line in head.decode().split("\r\n")]
        status = next((value for key, value in headers if key == "Status"), "200 OK")
        start_response(status, [h for h in headers if h[0] != "Status"] + [("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def git_http(repo) -> Iterator[GitHttpServer]:
    server = GitHttpServer(repo.bare.parent, TOKEN)
    yield server
    server.close()


def told(call: Callable[[], object]) -> RegistryError:
    """What a client is told of the error `call` raises (a source raises its own; the HTTP layer translates)."""
    with pytest.raises(Exception) as raised:
        call()
    return as_registry_error(raised.value)


def git_source(url: str, state_dir: Path, token: str | None) -> GitSource:
    state = StateLayout.under(state_dir)
    return GitSource(GitSettings(url=url, ttl=60, ssh_key=None, token=token, ssh_dir=state_dir / "no-ssh",
                                 ssh_agent=False, mirrors_dir=state.git, lock_dir=state.locks,
                                 store=state.store))


def test_https_token_is_offered_and_a_wrong_one_refused(repo, git_http, tmp_path):
    url = git_http.url(repo.bare.name)
    resolved = git_source(url, tmp_path / "good", TOKEN).resolve("release-v2")
    assert resolved.cache_key == f"git:{url}:{repo.commits['two']}"
    assert "twoonly" in (Path(resolved.args.argument) / "default.nix").read_text()
    for token, reason in (("wrong-token", "authentication refused"), (None, "no credentials are configured")):
        refused = told(lambda: git_source(url, tmp_path / f"bad-{token}", token).resolve("latest"))
        assert refused.status == 500 and refused.code == "UNKNOWN"
        assert refused.message.startswith(f"cannot fetch repository {url}: ")
        assert reason in refused.message


def offered(callbacks, url_user: str | None, allowed) -> list[tuple]:
    """Every credential `callbacks` offers until it gives up, as (type name, credential tuple)."""
    offers = []
    while True:
        try:
            credential = callbacks.credentials("url", url_user, allowed)
        except pygit2.GitError:
            return offers
        offers.append((type(credential).__name__, credential.credential_tuple))


def test_credentials_are_offered_as_git_users_expect(tmp_path):
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    for name in ("id_ed25519", "id_rsa", "id_rsa.pub"):
        (ssh / name).write_text("key")
    key = CredentialType.SSH_KEY
    assert offered(_Credentials(None, None, ssh, ssh_agent=False), "git", key) == [
        ("Keypair", ("git", None, str(ssh / "id_ed25519"), "")),
        ("Keypair", ("git", str(ssh / "id_rsa.pub"), str(ssh / "id_rsa"), ""))]
    assert offered(_Credentials(None, None, ssh, ssh_agent=True), "git", key) == [
        ("KeypairFromAgent", ("git", None, None, None)),
        ("Keypair", ("git", None, str(ssh / "id_ed25519"), "")),
        ("Keypair", ("git", str(ssh / "id_rsa.pub"), str(ssh / "id_rsa"), ""))]
    explicit = tmp_path / "deploy-key"
    explicit.write_text("key")
    assert offered(_Credentials(explicit, TOKEN, ssh, ssh_agent=True), "deploy", key) == [("Keypair", ("deploy", None, str(explicit), ""))]
    assert _Credentials(None, None, ssh, ssh_agent=False).credentials("url", None, CredentialType.USERNAME).credential_tuple == ("git",)
    https = CredentialType.USERPASS_PLAINTEXT
    assert offered(_Credentials(None, TOKEN, ssh, ssh_agent=False), None, https) == [("UserPass", ("x-access-token", TOKEN))]
    assert offered(_Credentials(None, TOKEN, ssh, ssh_agent=False), "oauth2", https) == [("UserPass", ("oauth2", TOKEN))]
    assert offered(_Credentials(None, None, ssh, ssh_agent=False), None, https) == []


@pytest.mark.parametrize("userinfo", ["someone:{}@", "{}@"])  # a token is often the user name alone
def test_source_errors_are_500_naming_the_source_never_its_credentials(start_server, repo, git_http, userinfo):
    embedded = "hunter2-in-the-url"
    url = git_http.url(repo.bare.name).replace("http://", "http://" + userinfo.format(embedded))
    server = start_server({"NIXERY_PKGS_REPO": url, "NIXERY_GIT_TOKEN": "also-wrong-" + TOKEN})
    response = manifest(server, "marker", "latest")
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "UNKNOWN" and "\n" not in error["message"]
    assert error["message"].startswith(f"cannot fetch repository {url.replace(embedded, '***')}: ")
    failures = [e for e in server.log_entries() if e.get("message") == "git fetch failed"]
    assert failures and "authentication" in failures[0]["reason"]
    for secret in (embedded, TOKEN):
        assert secret not in response.text and secret not in server.log()


def test_one_fetch_at_a_time_across_workers(start_server, repo, git_http):
    server = start_server({"NIXERY_PKGS_REPO": git_http.url(repo.bare.name), "NIXERY_GIT_TOKEN": TOKEN,
                           "NIXERY_WORKERS": "4", "NIXERY_THREADS": "16"})
    # Long enough for every request to arrive and queue while the first fetch runs; with as many
    # threads per worker as requests, none waits for a thread until after that fetch has ended.
    git_http.delay = 2.0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: manifest(server, "marker", "no-such-tag").status_code, range(16)))
    assert statuses == [404] * 16
    assert git_http.fetches == 1, "requests that queued behind a fetch must use its outcome"


# ---------------------------------------------------------------- channels --

class TarballServer:
    """Serves `<rev>.tar.gz` package sets on 127.0.0.1 and remembers which were asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.requested: list[str] = []
        handler = functools.partial(self._Handler, self, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    class _Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, owner: "TarballServer", *args, **kwargs):
            self.owner = owner
            super().__init__(*args, **kwargs)

        def do_GET(self) -> None:
            self.owner.requested.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{{rev}}.tar.gz"

    def add(self, rev: str, package_set: Path) -> None:
        """A tarball with one top-level directory, as GitHub's archives have."""
        with tarfile.open(self.root / f"{rev}.tar.gz", "w:gz") as tar:
            tar.add(package_set, arcname=f"nixpkgs-{rev}")


@pytest.fixture
def tarballs(tmp_path) -> Iterator[TarballServer]:
    root = tmp_path / "tarballs"
    root.mkdir()
    server = TarballServer(root)
    yield server
    server.server.shutdown()


def test_channel_tarballs_through_the_url_template(start_server, tarballs, nix_counter, tmp_path):
    pinned, broken = "1" * 40, "2" * 40
    tarballs.add("nixos-test", write_revision(tmp_path / "channel", "channel"))
    tarballs.add("nixos-extra", write_revision(tmp_path / "extra", "extra"))
    tarballs.add(pinned, write_revision(tmp_path / "pinned", "pinned"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "default.nix").write_text("{ ... }: this does not ( evaluate")
    tarballs.add(broken, tmp_path / "broken")
    server = start_server({"NIXERY_CHANNEL": "nixos-test", "NIXERY_CHANNEL_URL_TEMPLATE": tarballs.template,
                           "NIXERY_CHANNEL_ALLOW": "nixos-extra", "PATH": nix_counter.path()})

    assert marker_of(server, "latest", tmp_path) == "channel"
    assert marker_of(server, "nixos-extra", tmp_path) == "extra"
    assert marker_of(server, pinned, tmp_path / "first") == "pinned"
    assert {"/nixos-test.tar.gz", "/nixos-extra.tar.gz", f"/{pinned}.tar.gz"} <= set(tarballs.requested)

    before = nix_counter.count()
    assert marker_of(server, pinned, tmp_path / "again") == "pinned"
    assert nix_counter.count() == before, "a nixpkgs commit is pinned: served without Nix"
    assert manifest(server, "channelonly", "latest").status_code == 200
    assert nix_counter.count() > before, "a channel moves: it is evaluated again"

    refused = manifest(server, "marker", "nixos-other")
    assert refused.status_code == 404 and error_of(refused)["detail"] == {"tag": "nixos-other"}
    # A commit that does not evaluate fails the same way on every retry: a 4xx naming Nix's reason,
    # with the position inside the tarball's tree (not the store path it was unpacked to).
    failed = manifest(server, "marker", broken)
    assert failed.status_code == 422 and error_of(failed)["code"] == "UNKNOWN"
    message = error_of(failed)["message"]
    assert f"nixpkgs {broken}" in message and "\n" not in message and "syntax error" in message
    assert re.search(r" \(at default\.nix:1:\d+\)$", message) and "/nix/store" not in message, message

    # A commit the archive does not have (a typo, or nobody's): the tag names nothing, a 404 that
    # says so, as an unknown branch or tag of a git source is (it was a 500, the machine's fault).
    missing = "3" * 40
    absent = manifest(server, "marker", missing)
    assert absent.status_code == 404, absent.text
    assert error_of(absent)["code"] == "MANIFEST_UNKNOWN" and error_of(absent)["detail"] == {"tag": missing}
    assert "no such commit" in error_of(absent)["message"] and f"/{missing}.tar.gz" in error_of(absent)["message"]


# -------------------------------------------------------------- tag rules --

def test_channel_and_path_tag_rules():
    channel = ChannelSource("nixos-unstable", "https://mirror.example/{rev}.tgz", ("nixos-24.11",))
    assert channel.resolve("latest").cache_key is None
    assert channel.resolve("latest").args.argument == "https://mirror.example/nixos-unstable.tgz"
    assert channel.resolve("nixos-24.11").cache_key is None
    commit = "a" * 40
    assert channel.resolve(commit).cache_key == f"tarball:https://mirror.example/{commit}.tgz"
    pinned = ChannelSource(commit, "https://mirror.example/{rev}.tgz", ())
    assert pinned.resolve("latest").cache_key == channel.resolve(commit).cache_key
    for tag in ("nixos-23.05", "A" * 40, "v1"):
        unknown = told(lambda: channel.resolve(tag))
        assert unknown.status == 404 and unknown.detail == {"tag": tag}

    listed = ChannelSource("nixos-unstable", "https://mirror.example/{rev}.tgz", ("nixos-24.11",), (commit,))
    assert listed.resolve(commit).revision == commit and listed.tags() == ["a" * 40, "latest", "nixos-24.11"]
    for policy in ((), (commit,)):
        denied = told(lambda: ChannelSource("nixos-unstable", "https://mirror.example/{rev}.tgz", (), policy).resolve("b" * 40))
        assert denied.status == 403 and denied.code == "DENIED" and "NIXERY_CHANNEL_COMMITS" in str(denied)
    assert ChannelSource(commit, "https://mirror.example/{rev}.tgz", (), ()).resolve("latest").revision == commit

    path = PathSource("/srv/pkgs")
    assert path.resolve("latest").cache_key is None and path.resolve("latest").args.kind == "path"
    unknown = told(lambda: path.resolve("v1"))
    assert unknown.status == 404 and unknown.code == "MANIFEST_UNKNOWN"


# ------------------------------------------------------------------- tags --

def skopeo_inspect(host: str, name: str) -> dict:
    """`skopeo inspect` as users run it, tags and all (it lists them through /v2/<name>/tags/list)."""
    result = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/{name}:latest"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_skopeo_inspect_lists_the_tags_of_each_source(start_server, repo, tarballs, pkgset, tmp_path):
    git_server = start_server({"NIXERY_PKGS_REPO": repo.url})
    assert skopeo_inspect(git_server.host, "marker")["RepoTags"] == ["latest", "main", "release-v1", "release-v2"]

    tarballs.add("nixos-test", write_revision(tmp_path / "channel", "channel"))
    channel_server = start_server({"NIXERY_CHANNEL": "nixos-test", "NIXERY_CHANNEL_URL_TEMPLATE": tarballs.template,
                                   "NIXERY_CHANNEL_ALLOW": "nixos-24.11,nixos-extra"})
    assert skopeo_inspect(channel_server.host, "shell/marker")["RepoTags"] == ["latest", "nixos-24.11", "nixos-extra"]

    path_server = start_server({"NIXERY_PKGS_PATH": str(pkgset)})
    inspected = skopeo_inspect(path_server.host, "hello")
    assert inspected["RepoTags"] == ["latest"] and inspected["Architecture"] == "amd64"
