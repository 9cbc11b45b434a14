"""Grouping a runtime closure into at most a budget of layers.

Layers are shared between images only when they hold exactly the same store
paths, so the best layer is one store path: whatever other image needs that
path downloads it once. When the closure fits the budget, that is what every
path gets.

Beyond the budget some paths must share layers. Which ones stay alone is
decided by popularity: the configured data (NIX_POPULARITY_URL, the original
Nixery's format) when there is any, otherwise a popularity read off the
closure graph itself, as nixpkgs' `buildLayeredImage` does: a path counts as
many times as there are paths in the closure that depend on it. A C library
every program links is popular; a program's private plug-in is not.
The most popular paths, as many as the budget allows, then hang directly off
the image root in the original Nixery's graph (root -> requested packages ->
references), and the root's children in the dominator tree each become a
layer with everything they dominate: what only one package needs travels with
that package. If the requested packages alone exceed the budget, the layers
rated lowest (popularity x size) are merged until it fits, as upstream does.

Pure data in, data out, with every tie broken by store path, so the same
closure gives the same layers in the same order whatever the hash seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import networkx as nx

from .nix import StorePath

ROOT = "<image-root>"
# Thresholds from the original Nixery: a path above either always gets a layer of its own.
SIZE_THRESHOLD = 100 * 1000 * 1000
POPULARITY_THRESHOLD = 1000


@dataclasses.dataclass(frozen=True)
class Layer:
    paths: tuple[str, ...]
    rating: int
    size: int


def popularity_of(path: str, popularity: Mapping[str, int]) -> int:
    """Popularity data is keyed by the path's name without its hash; unknown paths count 1."""
    name = os.path.basename(path).split("-", 1)[-1]
    return max(1, popularity.get(name, 1))


def closure_popularity(closure: Mapping[str, StorePath]) -> dict[str, int]:
    """Each path's count of paths in `closure` that depend on it, itself included.

    Ancestor sets are bit sets (Python ints) propagated down the graph in
    topological order: linear in the edges, a few milliseconds for thousands of paths.
    Nix closures have no cycles but self-references; the condensation makes any cycle one node."""
    graph = nx.DiGraph()
    graph.add_nodes_from(sorted(closure))
    graph.add_edges_from((path, ref) for path in sorted(closure)
                         for ref in closure[path].references if ref in closure and ref != path)
    condensed = nx.condensation(graph)
    members: dict[int, list[str]] = {}
    for path, component in condensed.graph["mapping"].items():
        members.setdefault(component, []).append(path)
    bit = {component: 1 << component for component in condensed}
    ancestors = {component: 0 for component in condensed}
    for component in nx.topological_sort(condensed):
        mine = ancestors[component] | bit[component]
        for child in condensed.successors(component):
            ancestors[child] |= mine
    # Each bit counts one path; a (never seen in practice) cycle of n paths adds n - 1 more.
    extra = {component: len(paths) - 1 for component, paths in members.items() if len(paths) > 1}
    counts = {}
    for component, paths in members.items():
        above = ancestors[component].bit_count() + sum(n for c, n in extra.items() if ancestors[component] >> c & 1)
        for path in paths:
            counts[path] = above + len(paths)
    return counts


def _counts(closure: Mapping[str, StorePath], popularity: Mapping[str, int]) -> dict[str, int]:
    """Configured popularity when there is any (it knows the whole package set), else the closure's own."""
    if popularity:
        return {path: popularity_of(path, popularity) for path in closure}
    return closure_popularity(closure)


def _graph(closure: Mapping[str, StorePath], roots: Sequence[str], promoted: Sequence[str]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    graph.add_nodes_from(sorted(closure))
    graph.add_edges_from((ROOT, path) for path in sorted(set(roots) | set(promoted)) if path in closure)
    for path in sorted(closure):
        graph.add_edges_from((path, ref) for ref in closure[path].references if ref in closure and ref != path)
    return graph


def _dominator_groups(closure: Mapping[str, StorePath], roots: Sequence[str],
                      promoted: Sequence[str]) -> dict[str, list[str]]:
    """Top path -> every path it dominates (itself included), for each child of the image root."""
    graph = _graph(closure, roots, promoted)
    idom = nx.immediate_dominators(graph, ROOT)
    children: dict[str, list[str]] = {}
    for node, dominator in idom.items():
        if node != ROOT:
            children.setdefault(dominator, []).append(node)
    groups = {}
    for top in children.get(ROOT, ()):
        found, stack = [], [top]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(children.get(node, ()))
        groups[top] = found
    # Paths the root cannot reach (none when `roots` covers the closure) still belong in the image.
    reached = {path for paths in groups.values() for path in paths}
    for path in sorted(set(closure) - reached):
        groups[path] = [path]
    return groups


def group(closure: Mapping[str, StorePath], roots: Sequence[str],
          popularity: Mapping[str, int], budget: int) -> list[Layer]:
    """At most `budget` layers covering every path of `closure`, highest rated first."""
    if budget < 1:
        raise ValueError("the layer budget must be at least 1")
    counts = _counts(closure, popularity)

    def layer(paths: Sequence[str], top: str) -> Layer:
        size = sum(closure[p].nar_size for p in paths)
        return Layer(paths=tuple(sorted(paths)), rating=counts[top] * size, size=size)

    if len(closure) <= budget:
        layers = [layer([path], path) for path in closure]
    else:
        forced = [p for p in closure if closure[p].nar_size > SIZE_THRESHOLD or counts[p] >= POPULARITY_THRESHOLD]
        ranked = sorted(closure, key=lambda p: (-counts[p], -closure[p].nar_size, p))

        def groups_with(k: int) -> dict[str, list[str]]:
            return _dominator_groups(closure, roots, forced + ranked[:k])

        # Promoting a path to the root never merges groups, so the count grows with k:
        # the largest k that fits is found by bisection.
        low, high = 0, len(ranked)
        best = groups_with(0)
        while low < high:
            middle = (low + high + 1) // 2
            candidate = groups_with(middle)
            if len(candidate) <= budget:
                low, best = middle, candidate
            else:
                high = middle - 1
        layers = [layer(paths, top) for top, paths in best.items()]

    layers.sort(key=lambda layer: (layer.rating, layer.paths))
    while len(layers) > budget:
        low_layer, next_low = layers[0], layers[1]
        merged = Layer(paths=tuple(sorted(low_layer.paths + next_low.paths)),
                       rating=low_layer.rating + next_low.rating, size=low_layer.size + next_low.size)
        layers = sorted([merged, *layers[2:]], key=lambda layer: (layer.rating, layer.paths))
    layers.sort(key=lambda layer: (-layer.rating, layer.paths))
    return layers
