"""A new user's first hour: the line start-up prints, finding which packages there are (as JSON and
in the page, in Chromium), and watching a long build progress in the log and on the page.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import falcon
import falcon.testing
import pytest
import requests
from browser import DESKTOP, PHONE, browser  # noqa: F401 (a fixture)
from pkgset import including
from support import ROOT, skopeo_pull

from nixery.__main__ import example_image
from nixery import error_handlers, web
from nixery.app import make_nix
from nixery.search import PackageSearch
from nixery.config import SourceKind, load
from nixery.history import BuildHistory
from nixery.progress import LineBudget
from nixery.sources.path import PathSource
from nixery.suggest import Suggestions

BUILD_SECONDS = 20


@pytest.fixture
def server(shared_server):
    """These tests only read: they share one server over the test package set."""
    return shared_server


def test_start_up_names_the_url_and_a_pull_that_works(server, tmp_path):
    [line] = [e for e in server.log_entries() if e.get("message", "").startswith("listening on ")]
    assert line["message"] == f"listening on http://{server.host}, try: docker pull {server.host}/shell/hello"
    assert line["level"] == "INFO"
    assert skopeo_pull(server.host, "shell/hello", tmp_path / "oci").returncode == 0


def test_the_example_is_one_the_set_offers():
    assert example_image(SourceKind.PATH, ["hello", "bashInteractive", "coreutils"]) == "shell/hello"
    assert example_image(SourceKind.PATH, ["hello"]) == "hello"
    assert example_image(SourceKind.PATH, ["git", "bashInteractive", "coreutils"]) == "shell"
    assert example_image(SourceKind.CHANNEL, None) == "shell/hello"  # nixpkgs, not evaluated at start-up


def search(server, **params: str) -> requests.Response:
    return requests.get(f"{server.url}/packages.json", params=params, timeout=60)


def test_packages_json_finds_names(server):
    found = search(server, q="hel")
    assert found.status_code == 200 and found.headers["Content-Type"].startswith("application/json")
    body = found.json()
    names = [p["name"] for p in body["packages"]]
    assert names[0] == "hello" and "oldHello" in names and body["total"] == len(names), body
    assert body["query"] == "hel"
    # Case does not matter (image names are lower case, attributes not), and a typo finds the name.
    assert "oldHello" in [p["name"] for p in search(server, q="OLDHEL").json()["packages"]]
    assert [p["name"] for p in search(server, q="helo").json()["packages"]] == ["hello"]
    # Without a query: every name (up to the limit), a nested set among them.
    everything = search(server).json()
    assert {"hello", "python3Packages", "bashInteractive"} <= {p["name"] for p in everything["packages"]}
    assert search(server, q="zzzzqqq").json() == {"query": "zzzzqqq", "packages": [], "total": 0, "images": []}
    # The page's pull command is an image name: lower case, and without the leading underscore of a digit.
    assert f"docker pull {server.host}/shell/7zip</code>" in requests.get(server.url + "/", params={"q": "7zi"},
                                                                         timeout=60).text


def test_hostile_queries(server):
    long = search(server, q="a" * 101)
    assert long.status_code == 400 and "100 characters" in long.json()["errors"][0]["message"]
    odd = "\"'<>&\\\u2028{}$(id)"
    answer = search(server, q=odd)
    assert answer.status_code == 200 and json.loads(answer.text)["query"] == odd.strip()
    page = requests.get(server.url + "/", params={"q": "<b>x</b>"}, timeout=60).text
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_page_search_in_chromium(server, browser):  # noqa: F811
    browser.load(server.url + "/", *DESKTOP)
    browser.load_by("document.getElementById('q').value = 'hel';"
                    "document.querySelector('form.search button').click(); true")
    assert browser.evaluate("location.search + location.hash") == "?q=hel#find"
    found = browser.evaluate("[...document.querySelectorAll('ul.names li')].map(li => li.textContent)")
    assert found[0] == "hello", found
    assert browser.evaluate("document.getElementById('q').value") == "hel"
    assert "2 names match hel" in browser.evaluate("document.getElementById('search-results').textContent")
    assert browser.evaluate("document.getElementById('search-pull').textContent") == \
        f"docker pull {server.host}/shell/hello"
    browser.load(server.url + "/?q=hel", *PHONE)
    assert browser.evaluate("document.documentElement.scrollWidth") <= PHONE[0], "the search overflows a phone"
    # What someone types comes back as text, never as markup.
    browser.load(server.url + "/?q=" + requests.utils.quote("<img src=x onerror=alert(1)>"), *DESKTOP)
    assert browser.evaluate("document.querySelectorAll('main img').length") == 0
    assert "<img src=x" in browser.evaluate("document.getElementById('search-results').textContent")
    assert browser.problems() == [], browser.problems()


def searching_app(source: Path, state: Path) -> falcon.testing.TestClient:
    """The page and /packages.json over the set at `source`, in this process, with a real Nix."""
    config = load({"HOME": str(state), "NIXERY_PKGS_PATH": str(source), "NIXERY_STATE_DIR": str(state)})
    package_search = PackageSearch(make_nix(config), PathSource(str(source)), Suggestions(), None)
    app = falcon.App()
    error_handlers.register(app)
    web.add_routes(app, config, BuildHistory(config.state), package_search=package_search)
    return falcon.testing.TestClient(app)


def test_search_evaluates_a_set_once_per_revision(pkgset, nix_counter, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", nix_counter.path())
    client = searching_app(pkgset, tmp_path)
    for query in ("hel", "git", "python", ""):
        assert client.simulate_get("/packages.json", params={"q": query}).status_code == 200
    assert "hello" in client.simulate_get("/", params={"q": "hel"}).text
    assert nix_counter.count() == 1, nix_counter.calls.read_text()


def test_a_set_that_does_not_evaluate_says_why(tmp_path, nix_counter, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "default.nix").write_text("{ system ? builtins.currentSystem }:\n{ hello = 1 }\n")
    client = searching_app(broken, tmp_path / "state")
    monkeypatch.setenv("PATH", nix_counter.path())
    answer = client.simulate_get("/packages.json", params={"q": "hel"})
    assert answer.status_code >= 500 and "syntax error" in answer.json["errors"][0]["message"], answer.text
    page = client.simulate_get("/", params={"q": "hel"})
    assert page.status_code == 200 and "cannot be searched now" in page.text and "syntax error" in page.text
    for query in ("a", "b", "c", "d"):  # a client's queries cost no evaluation each while it stays broken
        again = client.simulate_get("/packages.json", params={"q": query})
        assert again.status_code == answer.status_code and "syntax error" in again.text, again.text
    assert nix_counter.count() == 1, nix_counter.calls.read_text()


def test_example_set_lists_what_works_and_what_stands_in(tmp_path):
    """What scripts/example-pkgset prints once it has written the set."""
    listed = subprocess.run([sys.executable, str(ROOT / "tests" / "pkgset.py"), str(tmp_path / "set"), "--list"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    working, stand_ins, nested, _ = listed.split("\n\n")
    names = lambda section: {line.split()[0] for line in section.splitlines()[1:]}  # noqa: E731
    assert {"hello", "bashInteractive", "coreutils", "busybox"} <= names(working)
    assert {"git", "python3", "nano", "cacert"} <= names(stand_ins) and not names(working) & names(stand_ins)
    assert "Hello, world!" in working and "python3Packages.{" in nested and "requests" in nested
    assert not {"broken", "youtube-dl", "unfreeTool"} & (names(working) | names(stand_ins))


def test_line_budget_lets_a_quiet_build_through_and_holds_a_flood():
    now = [0.0]
    budget = LineBudget(rate=2, burst=5, clock=lambda: now[0])
    assert [budget.take() for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.release_held() == 2 and budget.release_held() == 0
    now[0] += 1.0
    assert [budget.take() for _ in range(3)] == [True, True, False]
    quiet = LineBudget(rate=2, burst=5, clock=lambda: now[0])
    for _ in range(60):  # one line a second, for a minute: every one is taken
        now[0] += 1.0
        assert quiet.take()


def chatty_package_set(directory: Path, base: Path) -> Path:
    """The test set and `chatty`, whose build prints a line a second for BUILD_SECONDS seconds
    (new store paths on every run, so that it really builds)."""
    directory.mkdir(parents=True)
    (directory / "default.nix").write_text(f"""
{{ system ? builtins.currentSystem }}:
let base = import {including(directory, base)} {{ inherit system; }};
in base // {{
  chatty = derivation {{
    name = "chatty";
    inherit system;
    salt = "{time.time_ns()}";
    builder = "${{base.busybox}}/bin/sh";
    args = [ "-c" ''
      for i in $(${{base.busybox}}/bin/busybox seq 1 {BUILD_SECONDS}); do
        echo "chatty step $i of {BUILD_SECONDS}"
        ${{base.busybox}}/bin/busybox sleep 1
      done
      ${{base.busybox}}/bin/busybox mkdir -p $out/bin
    '' ];
  }};
}}
""")
    return directory


def test_a_long_build_shows_its_output_while_it_runs(start_server, pkgset, tmp_path, browser):  # noqa: F811
    server = start_server({"NIXERY_PKGS_PATH": str(chatty_package_set(tmp_path / "chatty", pkgset))})
    pulled: list[int] = []
    pull = threading.Thread(target=lambda: pulled.append(
        requests.get(f"{server.url}/v2/chatty/manifests/latest", timeout=120).status_code))
    pull.start()

    def running() -> list[dict]:
        return requests.get(f"{server.url}/builds.json", timeout=10).json()["in_progress"]

    seen: list[dict] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("chatty step 3 " in e["nix"] for e in seen):
        seen = [e for e in server.log_entries() if e.get("image") == "chatty" and "nix" in e]
        time.sleep(0.2)
    assert running(), "the build ended before its output was seen"
    steps = [e for e in seen if e["nix"].startswith("chatty step ")]
    assert steps and all(e["level"] == "INFO" and e["message"] == "nix output" for e in steps), seen
    assert [e["nix"] for e in steps[:3]] == [f"chatty step {i} of {BUILD_SECONDS}" for i in (1, 2, 3)]

    # The page: Building now at the top, with the builder's latest line, reloading itself.
    page = requests.get(server.url + "/", timeout=10).text
    assert page.index('id="running"') < page.index('id="pull"') and "chatty:latest" in page
    assert '<meta http-equiv="refresh"' in page
    browser.load(server.url + "/", *DESKTOP)
    loaded = len(browser.events)
    browser.evaluate("window.loadedOnce = true")
    first = browser.evaluate("document.querySelector('section.running')?.textContent ?? ''")
    assert "chatty step" in first, first
    browser.wait_for("Page.loadEventFired", timeout=15, since=loaded)
    assert browser.evaluate("window.loadedOnce") is None, "the page did not reload itself"
    assert browser.evaluate("document.querySelector('section.running')?.textContent ?? ''") != first
    pull.join()
    assert pulled == [200]
    # Once the build is over, the page stops reloading.
    assert '<meta http-equiv="refresh"' not in requests.get(server.url + "/", timeout=10).text
    assert browser.problems() == [], browser.problems()
