"""The layering algorithm, on synthetic closures (pure data, no Nix)."""

import os
import random
import subprocess
import sys

from nixery.layers import POPULARITY_THRESHOLD, SIZE_THRESHOLD, group
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


def test_dominated_paths_share_a_layer():
    c = closure(sp("app", ["lib"]), sp("lib", ["libc"]), sp("libc"), sp("tool", ["libc"]))
    layers = group(c, [sp("app").path, sp("tool").path], {}, budget=10)
    by_top = {min(layer.paths): layer.paths for layer in layers}
    assert covers_exactly(layers, c)
    # libc is shared by app and tool: it is its own layer; lib goes with app, which alone needs it.
    assert (sp("libc").path,) in by_top.values()
    assert tuple(sorted([sp("app").path, sp("lib").path])) in by_top.values()


def test_budget_is_respected_and_everything_is_covered():
    full, roots = random_closure(300, seed=1)
    for budget in (1, 2, 5, 20, 94):
        layers = group(full, roots, {}, budget)
        assert 1 <= len(layers) <= budget
        assert covers_exactly(layers, full)


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
