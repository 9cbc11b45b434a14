"""The layering algorithm, on synthetic closures (pure data, no Nix), and the popularity command."""

import os
import random
import shutil
import subprocess
import sys

import pytest

from nixery.layers import POPULARITY_THRESHOLD, SIZE_THRESHOLD, closure_popularity, group
from nixery.nix import StorePath


def sp(name: str, refs=(), size=1000) -> StorePath:
    return StorePath(f"/nix/store/{name[0] * 32}-{name}", tuple(f"/nix/store/{r[0] * 32}-{r}" for r in refs), size)


def closure(*paths: StorePath) -> dict:
    return {p.path: p for p in paths}


def random_closure(n: int, seed: int) -> tuple[dict, list]:
    rng = random.Random(seed)
    names = [f"{chr(97 + i % 26)}pkg{i}" for i in range(n)]
    paths = {}
    for i, name in enumerate(names):
        refs = rng.sample(names[i + 1:], min(len(names) - i - 1, rng.randint(0, 4)))
        paths[name] = sp(name, refs, rng.randint(1, 10_000_000))
    full = closure(*paths.values())
    roots = [paths[n].path for n in rng.sample(names[:20], 5)]
    return full, roots


def covers_exactly(layers, full):
    seen = [p for layer in layers for p in layer.paths]
    return sorted(seen) == sorted(full) and len(seen) == len(set(seen))


def test_a_closure_within_the_budget_gets_one_layer_per_path():
    full, roots = random_closure(94, seed=5)
    layers = group(full, roots, {}, budget=94)
    assert sorted(layer.paths for layer in layers) == sorted((p,) for p in full)
    assert covers_exactly(group(full, roots, {}, budget=93), full)
    assert len(group(full, roots, {}, budget=93)) <= 93


def test_beyond_the_budget_what_a_kept_path_alone_needs_shares_a_layer():
    # app is big and alone needs lib and plugin; libc is needed by everything.
    c = closure(sp("app", ["lib", "plugin"], size=10_000_000), sp("lib", ["libc"]), sp("plugin"), sp("libc"),
                sp("tool", ["libc"]))
    layers = group(c, [sp("app").path, sp("tool").path], {}, budget=4)
    assert sorted(layer.paths for layer in layers) == sorted([
        (sp("app").path,), (sp("libc").path,), (sp("tool").path,), tuple(sorted([sp("lib").path, sp("plugin").path]))])


def test_budget_is_respected_and_everything_is_covered():
    full, roots = random_closure(300, seed=1)
    for budget in (1, 2, 5, 20, 94, 299, 300):
        layers = group(full, roots, {}, budget)
        assert 1 <= len(layers) <= budget
        assert covers_exactly(layers, full)


def test_closure_popularity_counts_the_paths_that_depend_on_each_path():
    c = closure(sp("app", ["lib", "libc"]), sp("lib", ["libc"]), sp("libc"), sp("tool", ["libc"]))
    assert closure_popularity(c) == {sp("app").path: 1, sp("tool").path: 1, sp("lib").path: 2, sp("libc").path: 4}


def nixpkgs_like(*wanted: str) -> tuple[dict, list]:
    """A closure shaped like nixpkgs': everything links libc, many things zlib and openssl,
    each program has a private library or two; `wanted` are the requested programs."""
    graph = {
        "libc": [], "zlib": ["libc"], "openssl": ["libc"], "pcre": ["libc"], "expat": ["libc"],
        "ncurses": ["libc"], "readline": ["ncurses", "libc"], "sqlite": ["readline", "zlib", "libc"],
        "curl": ["curlLib", "openssl", "zlib", "libc"], "curlLib": ["nghttp", "openssl", "zlib", "libc"],
        "nghttp": ["libc"], "git": ["curlLib", "gitPerl", "pcre", "expat", "zlib", "openssl", "libc"],
        "gitPerl": ["perl"], "perl": ["libc"], "jq": ["onig", "libc"], "onig": ["libc"],
        "python": ["pyLib", "openssl", "zlib", "sqlite", "readline", "expat", "libc"], "pyLib": ["libc"],
        "requests": ["python", "urllib", "idna"], "urllib": ["python"], "idna": ["python"],
    }
    needed, stack = set(), list(wanted)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(graph[name])
    return closure(*(sp(n, graph[n], 1_000_000 + len(n)) for n in needed)), [sp(n).path for n in wanted]


def test_beyond_the_budget_the_most_shared_paths_keep_their_own_layers():
    full, roots = nixpkgs_like("git", "jq", "python", "requests")
    layers = group(full, roots, {}, budget=8)
    assert len(layers) <= 8 and covers_exactly(layers, full)
    alone = {layer.paths[0] for layer in layers if len(layer.paths) == 1}
    # Everything links libc; zlib and openssl are next: they stay alone, as they would in any other image.
    assert {sp("libc").path, sp("zlib").path, sp("openssl").path} <= alone


def test_shared_paths_give_the_same_layers_in_related_images():
    """git and curl/git: every layer of git that curl/git also needs is byte-for-byte the same layer."""
    for budget in (6, 8):
        git, git_roots = nixpkgs_like("git")
        both, both_roots = nixpkgs_like("curl", "git")
        assert len(both) > budget
        git_layers = {layer.paths for layer in group(git, git_roots, {}, budget)}
        both_layers = {layer.paths for layer in group(both, both_roots, {}, budget)}
        shared = git_layers & both_layers
        shared_paths = {p for paths in shared for p in paths}
        assert {sp("libc").path, sp("zlib").path, sp("openssl").path} <= shared_paths, budget


def test_configured_popularity_wins_over_the_closure_graph():
    full, roots = nixpkgs_like("git", "jq")
    without = group(full, roots, {}, budget=6)
    assert (sp("pcre").path,) not in [layer.paths for layer in without]
    # Popularity data says pcre is everywhere (in a real package set it might be).
    name = os.path.basename(sp("pcre").path).split("-", 1)[1]
    layers = group(full, roots, {name: 500}, budget=6)
    assert (sp("pcre").path,) in [layer.paths for layer in layers]
    assert covers_exactly(layers, full) and len(layers) <= 6


def test_popular_and_large_paths_get_their_own_layers():
    c = closure(sp("app", ["glibc", "huge"]), sp("glibc"), sp("huge", size=SIZE_THRESHOLD + 1), sp("other", ["glibc"]))
    popularity = {"glibc": POPULARITY_THRESHOLD}
    layers = group(c, [sp("app").path], popularity, budget=10)
    assert (sp("glibc").path,) in [layer.paths for layer in layers]
    assert (sp("huge").path,) in [layer.paths for layer in layers]
    # Highest rated (popularity x size) first.
    assert [layer.rating for layer in layers] == sorted((layer.rating for layer in layers), reverse=True)
    assert layers[0].paths == (sp("huge").path,)


def test_deterministic_whatever_the_input_order():
    full, roots = random_closure(200, seed=2)
    expected = group(full, roots, {}, 15)
    shuffled = list(full.items())
    random.Random(3).shuffle(shuffled)
    assert group(dict(shuffled), list(reversed(roots)), {}, 15) == expected


def test_deterministic_across_hash_seeds():
    code = ("import sys; sys.path[:0] = [%r, %r]; from test_layers import random_closure; "
            "from nixery.layers import group; full, roots = random_closure(200, 4); "
            "print([l.paths for l in group(full, roots, {}, 12)])")
    here = os.path.dirname(__file__)
    outputs = {subprocess.run([sys.executable, "-c", code % (here, os.path.dirname(here))],
                              env={**os.environ, "PYTHONHASHSEED": str(seed)},
                              capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3)}
    assert len(outputs) == 1


def test_popularity_data_loads_from_a_file(tmp_path):
    import pytest
    from nixery import popularity
    good = tmp_path / "popularity.json"
    good.write_text('{"glibc-2.39": 5000, "hello-2.12": 3}')
    assert popularity.load(str(good)) == {"glibc-2.39": 5000, "hello-2.12": 3}
    assert popularity.load(None) == {}
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "a", "map"]')
    with pytest.raises(popularity.PopularityError, match="NIX_POPULARITY_URL"):
        popularity.load(str(bad))


needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                               reason="the popularity command runs Nix (the package's build-time tests run without)")


@needs_nix
def test_popularity_command_counts_the_packages_whose_closures_hold_each_path(pkgset, tmp_path):
    from support import NIX_ENV
    from nixery import popularity
    out = tmp_path / "popularity.json"
    result = subprocess.run([sys.executable, "-m", "nixery", "popularity", "--path", str(pkgset), "--build",
                             "--attr", "git", "--attr", "curl", "--attr", "python3Packages.requests",
                             "--attr", "nosuchpackage", "-o", str(out)],
                            env={**os.environ, **NIX_ENV}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = popularity.load(str(out))
    assert data["glibc-2.40"] == 3 and data["openssl-3.3.2"] == 3
    assert data["curl-8.11.0-lib"] == 2  # git and curl, not python
    assert data["git-2.47.0"] == 1 and data["python3.12-idna-3.10"] == 1
    assert "3 packages counted" in result.stderr


@needs_nix
def test_popularity_command_reads_closures_from_a_binary_cache(pkgset, tmp_path):
    from support import NIX_ENV
    from nixery import popularity
    env = {**os.environ, **NIX_ENV}
    git = subprocess.run(["nix-build", str(pkgset), "-A", "git", "--no-out-link"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    # Uncompressed: the closures are what is read, and xz over 20 MiB of random bytes takes seconds.
    cache = f"file://{tmp_path / 'cache'}?compression=none"
    subprocess.run(["nix", "--extra-experimental-features", "nix-command", "copy", "--to", cache, git],
                   env=env, capture_output=True, text=True, check=True)
    out = tmp_path / "popularity.json"
    result = subprocess.run([sys.executable, "-m", "nixery.popularity", "--path", str(pkgset), "--store", cache,
                             "--attr", "git", "--attr", "nodejs", "-o", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = popularity.load(str(out))
    # git's closure came from the cache; nodejs is not in it, so it is skipped (nothing is built).
    assert data["git-2.47.0"] == 1 and data["glibc-2.40"] == 1 and "nodejs-22.11.0" not in data
    assert "1 packages counted, 1 not in the store skipped" in result.stderr
