"""Grouping a runtime closure into at most a budget of layers.

Layers are shared between images only when they hold exactly the same store
paths, so the best layer is one store path: whatever other image needs that
path downloads it once. When the closure fits the budget, that is what every
path gets.

Beyond the budget some paths must share layers. Which ones stay alone is
decided by popularity x size: popularity from the configured data
(NIX_POPULARITY_URL, the original Nixery's format) when there is any,
otherwise read off the closure graph itself, as nixpkgs' `buildLayeredImage`
does: a path counts as many times as there are paths in the closure that
depend on it. A C library every program links is popular; a program's
private plug-in is not. The paths rated highest keep layers of their own
(paths above upstream's size or popularity thresholds first). The
others are grouped with upstream's dominator tree (image root -> requested
packages -> references): those whose nearest kept dominator is the same path
share one layer, so what only git needs travels together, apart from git
itself, and the same set is found again in the next image that has git.
As many paths are kept as the budget allows: each costs its own layer and at
most one more for what it dominates.

Pure data in, data out, with every tie broken by store path, so the same
closure gives the same layers in the same order whatever the hash seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import networkx as nx


ROOT = "<image-root>"
# Thresholds from the original Nixery: a path above either always gets a layer of its own.
SIZE_THRESHOLD = 100 * 1000 * 1000
POPULARITY_THRESHOLD = 1000


@dataclasses.dataclass(frozen=True)
class StorePath:
    """What layering needs of a store path; `nix` reads these from `nix path-info`."""

    path: str
    references: tuple[str, ...]
    nar_size: int


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


def _dominators(closure: Mapping[str, StorePath], roots: Sequence[str]) -> dict[str, str]:
    """Each path's immediate dominator in the graph image root -> requested packages -> references."""
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    graph.add_nodes_from(sorted(closure))
    graph.add_edges_from((ROOT, path) for path in sorted(set(roots)) if path in closure)
    for path in sorted(closure):
        graph.add_edges_from((path, ref) for ref in closure[path].references if ref in closure and ref != path)
    idom = nx.immediate_dominators(graph, ROOT)
    # Paths the root cannot reach (none when `roots` covers the closure) hang off the root.
    return {path: idom.get(path, ROOT) for path in closure}


def _grouped(closure: Mapping[str, StorePath], idom: Mapping[str, str],
             kept: set[str]) -> dict[str, list[str]]:
    """Every kept path alone; every other path with the others whose nearest kept dominator is its own."""
    groups: dict[str, list[str]] = {path: [path] for path in kept}
    for path in sorted(set(closure) - kept):
        owner = idom[path]
        while owner != ROOT and owner not in kept:
            owner = idom[owner]
        groups.setdefault(f"{owner}\0rest", []).append(path)
    return groups


def group(closure: Mapping[str, StorePath], roots: Sequence[str],
          popularity: Mapping[str, int], budget: int) -> list[Layer]:
    """At most `budget` layers covering every path of `closure`, highest rated first."""
    if budget < 1:
        raise ValueError("the layer budget must be at least 1")
    counts = _counts(closure, popularity)
    if len(closure) <= budget:
        groups = {path: [path] for path in closure}
    else:
        # Kept alone first: the paths above upstream's thresholds, then the others; each by popularity x size.
        def rank(p: str) -> tuple[bool, int, int, str]:
            above = closure[p].nar_size > SIZE_THRESHOLD or counts[p] >= POPULARITY_THRESHOLD
            return not above, -counts[p] * closure[p].nar_size, -counts[p], p
        ranked = sorted(closure, key=rank)
        idom = _dominators(closure, roots)
        # Each kept path adds its own layer and at most one of the paths it dominates:
        # from budget - 1 kept paths down until the layers fit (one layer, all paths, always does).
        kept = budget - 1
        while len(groups := _grouped(closure, idom, set(ranked[:kept]))) > budget:
            kept = max(0, kept - max(1, (len(groups) - budget + 1) // 2))
    layers = []
    for paths in groups.values():
        size = sum(closure[p].nar_size for p in paths)
        rating = max(counts[p] for p in paths) * size
        layers.append(Layer(paths=tuple(sorted(paths)), rating=rating, size=size))
    layers.sort(key=lambda layer: (-layer.rating, layer.paths))
    return layers
