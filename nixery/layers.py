"""Grouping a runtime closure into at most a budget of layers.

This follows the original Nixery (and its description in "Optimising for
layer reuse"): build a graph from an image root to the requested packages and
along references; hang very large or very popular paths directly off the root
so that they get layers of their own; the root's children in the dominator
tree each become a layer with everything they dominate; the layers rated
lowest (popularity x size) are merged until the budget fits.

Pure data in, data out, with every tie broken by store path, so the same
closure gives the same layers in the same order whatever the hash seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import networkx as nx


ROOT = "<image-root>"
# Thresholds from the original Nixery: a path above either gets a layer of its own.
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


def _graph(closure: Mapping[str, StorePath], roots: Sequence[str],
           popularity: Mapping[str, int]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    for path in sorted(closure):
        graph.add_node(path)
    for path in sorted(set(roots)):
        graph.add_edge(ROOT, path)
    for path in sorted(closure):
        info = closure[path]
        if info.nar_size > SIZE_THRESHOLD or popularity_of(path, popularity) >= POPULARITY_THRESHOLD:
            graph.add_edge(ROOT, path)
        for ref in info.references:
            if ref in closure:
                graph.add_edge(path, ref)
    return graph


def group(closure: Mapping[str, StorePath], roots: Sequence[str],
          popularity: Mapping[str, int], budget: int) -> list[Layer]:
    """At most `budget` layers covering every path of `closure`, most shared first."""
    if budget < 1:
        raise ValueError("the layer budget must be at least 1")
    graph = _graph(closure, roots, popularity)
    idom = nx.immediate_dominators(graph, ROOT)
    children: dict[str, list[str]] = {}
    for node, dominator in idom.items():
        if node != ROOT:
            children.setdefault(dominator, []).append(node)

    def members(top: str) -> list[str]:
        found, stack = [], [top]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(children.get(node, ()))
        return found

    layers = []
    for top in sorted(children.get(ROOT, ())):
        paths = tuple(sorted(members(top)))
        size = sum(closure[p].nar_size for p in paths)
        layers.append(Layer(paths=paths, size=size, rating=popularity_of(top, popularity) * size))
    # Paths the root cannot reach (none when `roots` covers the closure) still belong in the image.
    unreachable = tuple(sorted(set(closure) - {p for layer in layers for p in layer.paths}))
    if unreachable:
        layers.append(Layer(unreachable, 0, sum(closure[p].nar_size for p in unreachable)))

    layers.sort(key=lambda layer: (layer.rating, layer.paths))
    while len(layers) > budget:
        low, next_low = layers[0], layers[1]
        merged = Layer(paths=tuple(sorted(low.paths + next_low.paths)),
                       rating=low.rating + next_low.rating, size=low.size + next_low.size)
        layers = sorted([merged, *layers[2:]], key=lambda layer: (layer.rating, layer.paths))
    layers.sort(key=lambda layer: (-layer.rating, layer.paths))
    return layers
