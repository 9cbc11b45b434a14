"""Where `nixery push` finds a registry's credentials, and how it answers its challenge
(nixery/registry_login.py); the end-to-end logins are in tests/test_build_push.py."""

from __future__ import annotations

import base64
import json
import urllib.parse
from pathlib import Path

import pytest

from nixery.local import CommandError
from nixery.registry_login import Credential, find, parse_challenge, token_request

HOST = "registry.invalid:5000"


def auth(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_the_first_file_with_an_entry_wins_in_skopeos_then_dockers_order(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert find(HOST, "team/app", env) is None
    write(tmp_path / "home" / ".docker" / "config.json", {"auths": {f"https://{HOST}/v1/": auth("docker", "d")}})
    assert find(HOST, "team/app", env) == Credential("docker", "d")
    write(tmp_path / "home" / ".config" / "containers" / "auth.json", {"auths": {HOST: auth("config", "c")}})
    assert find(HOST, "team/app", env) == Credential("config", "c")
    write(tmp_path / "run" / "containers" / "auth.json", {"auths": {"other.invalid": auth("x", "x")}})
    assert find(HOST, "team/app", env) == Credential("config", "c"), "a file without the registry is passed over"
    write(tmp_path / "run" / "containers" / "auth.json", {"auths": {HOST: auth("runtime", "r")}})
    assert find(HOST, "team/app", env) == Credential("runtime", "r")
    named = write(tmp_path / "named.json", {"auths": {HOST: auth("named", "n")}})
    assert find(HOST, "team/app", {**env, "REGISTRY_AUTH_FILE": str(named)}) == Credential("named", "n")
    given = write(tmp_path / "given.json", {"auths": {HOST: auth("given", "g")}})
    assert find(HOST, "team/app", {**env, "REGISTRY_AUTH_FILE": str(named)}, str(given)) == Credential("given", "g")
    with pytest.raises(CommandError, match="no such file"):
        find(HOST, "team/app", env, str(tmp_path / "missing.json"))


def test_a_repository_scoped_entry_applies_below_it_only_and_the_longest_wins(tmp_path):
    path = write(tmp_path / "auth.json", {"auths": {HOST: auth("registry", "1"), f"{HOST}/team": auth("team", "2"),
                                                    f"{HOST}/team/app": auth("app", "3")}})
    env = {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(path)}
    assert find(HOST, "team/app", env).username == "app"
    assert find(HOST, "team/other", env).username == "team"
    assert find(HOST, "teamwork/app", env).username == "registry"
    assert find("registry.invalid", "team/app", env) is None, "another port is another registry"


def test_bad_entries_name_the_file_and_never_the_secret(tmp_path):
    for entry in ({"auth": "not base64!"}, {"auth": base64.b64encode(b"no-colon-secret").decode()}):
        path = write(tmp_path / "auth.json", {"auths": {HOST: entry}})
        with pytest.raises(CommandError) as raised:
            find(HOST, "app", {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(path)})
        assert str(path) in str(raised.value) and "secret" not in str(raised.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CommandError, match="cannot read credentials"):
        find(HOST, "app", {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "broken.json")})


def test_dockers_credential_helpers_are_asked(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    # A helper as docker-credential-pass and the others are: the registry on stdin, JSON out.
    helper.write_text('#!/bin/sh\nread host\ncase "$host" in\n'
                      f'  {HOST}) echo \'{{"ServerURL":"{HOST}","Username":"helped","Secret":"s3"}}\' ;;\n'
                      '  token.invalid) echo \'{"ServerURL":"token.invalid","Username":"<token>","Secret":"rt"}\' ;;\n'
                      '  *) echo "credentials not found in native keychain"; exit 1 ;;\nesac\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    env = {"HOME": str(tmp_path)}
    config = tmp_path / ".docker" / "config.json"
    write(config, {"credHelpers": {HOST: "fake"}, "auths": {HOST: auth("plain", "p")}})
    assert find(HOST, "app", env) == Credential("helped", "s3")
    write(config, {"credsStore": "fake", "auths": {"elsewhere.invalid": auth("plain", "p")}})
    assert find("token.invalid", "app", env) == Credential("", identity_token="rt")
    assert find("elsewhere.invalid", "app", env) == Credential("plain", "p"), "the store has none: auths answer"
    write(config, {"credHelpers": {HOST: "../evil"}})
    with pytest.raises(CommandError, match="not a helper name"):
        find(HOST, "app", env)


def test_the_bearer_challenge_becomes_the_token_request():
    challenge = parse_challenge('Bearer realm="https://auth.invalid/token",service="reg istry",'
                                'scope="repository:team/app:pull"')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.invalid/token", "service": "reg istry",
                                "scope": "repository:team/app:pull"}
    scopes = ["repository:team/app:pull,push", "repository:team/base:pull"]
    url, body, headers = token_request(challenge, scopes, Credential("u", "p"))
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert body is None and query == {"service": ["reg istry"], "scope": scopes, "account": ["u"]}
    assert headers == {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    # An identity token (docker login to a registry with OAuth) is exchanged by POST.
    url, body, headers = token_request(challenge, scopes, Credential("u", identity_token="refresh"))
    form = urllib.parse.parse_qs(body.decode())
    assert url == "https://auth.invalid/token" and form["grant_type"] == ["refresh_token"]
    assert form["refresh_token"] == ["refresh"] and form["scope"] == [" ".join(scopes)]
    assert parse_challenge('Basic realm="test"').scheme == "basic"
    with pytest.raises(CommandError, match="not an http"):
        token_request(parse_challenge('Bearer realm="file:///etc/passwd"'), scopes, None)
