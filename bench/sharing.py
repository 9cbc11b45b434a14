#!/usr/bin/env python3
"""Layer sharing between related images: bytes a client downloads against the ideal.

Generates the test package set (its nixpkgs-like family: glibc, openssl,
curl, git, python3, python3Packages.requests, ...) with fresh store paths,
starts a real Nixery on its defaults (budget 94, no popularity data), and
pulls a corpus of related images one after another with skopeo into ONE OCI
layout, as a machine pulling them in turn would: a blob already in the
layout is not downloaded again. The bytes of the blobs each pull added are
what it downloaded.

The ideal is one layer per store path: every distinct store path of the
corpus archived once on its own (Nixery's own archiver, so compression is
the same), plus each image's root layer, config and manifest, which no
layering can share. The same per-path sizes estimate what other budgets and
other layerings would download (no pull: each layer's size taken as the sum
of its paths'): the original Nixery's without popularity data (dominator
groups, lowest rated merged) and nixpkgs' buildLayeredImage (its popularity
contest: the most depended-on paths alone, the rest in the last layer).

    python3 bench/sharing.py [--budget 94] [--estimate 94,40,20,10]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import NIX_ENV, Server  # noqa: E402
from pkgset import make_package_set  # noqa: E402

import networkx as nx  # noqa: E402

from nixery import archive, image, layers  # noqa: E402
from nixery.nix import Nix, SourceArgs, StorePath  # noqa: E402

CORPUS = [
    "shell", "shell/git", "shell/git/curl", "git", "curl/git", "curl", "jq", "git/jq", "shell/jq/curl",
    "python3", "python3packages.requests", "python3/python3packages.pyyaml",
    "shell/python3packages.requests", "python3packages.python-dateutil/python3packages.requests",
    "wget", "wget/curl", "openssh", "git/openssh", "vim", "htop", "shell/htop/vim", "rsync",
    "gnutar/rsync", "sqlite", "gawk/gnugrep/gnused", "less/git", "nodejs", "git/nodejs",
]


class Counter:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def upstream_layers(closure: dict[str, StorePath], roots: list[str], budget: int) -> list[tuple[str, ...]]:
    """The original Nixery's layering without popularity data (every path counts 1)."""
    graph = nx.DiGraph()
    graph.add_edges_from(("<root>", p) for p in roots)
    graph.add_edges_from(("<root>", p) for p in closure if closure[p].nar_size > layers.SIZE_THRESHOLD)
    graph.add_edges_from((p, r) for p in closure for r in closure[p].references if r in closure and r != p)
    idom = nx.immediate_dominators(graph, "<root>")
    groups: dict[str, list[str]] = {}
    for path in closure:
        top = path
        while idom[top] != "<root>":
            top = idom[top]
        groups.setdefault(top, []).append(path)
    rated = sorted((sum(closure[p].nar_size for p in paths), tuple(sorted(paths))) for paths in groups.values())
    while len(rated) > budget:  # the two lowest rated (popularity 1 x size) merge
        (size_a, a), (size_b, b) = rated[0], rated[1]
        rated = sorted([(size_a + size_b, tuple(sorted(a + b))), *rated[2:]])
    return [paths for _, paths in rated]


def build_layered_image_layers(closure: dict[str, StorePath], budget: int) -> list[tuple[str, ...]]:
    """nixpkgs' buildLayeredImage: the budget - 1 most depended-on paths alone, the rest in one layer."""
    counts = layers.closure_popularity(closure)
    order = sorted(closure, key=lambda p: (-counts[p], p))
    return [(p,) for p in order[:budget - 1]] + ([tuple(sorted(order[budget - 1:]))] if len(order) >= budget else [])


def blob_sizes(oci: Path) -> dict[str, int]:
    directory = oci / "blobs" / "sha256"
    return {p.name: p.stat().st_size for p in directory.iterdir()} if directory.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=94, help="NIXERY_LAYER_BUDGET of the server")
    parser.add_argument("--estimate", default="94,40,20,10", help="budgets to estimate from per-path sizes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixery-sharing-"))
    atexit.register(shutil.rmtree, work, True)  # storage and OCI layouts: hundreds of MB
    pkgset = make_package_set(work / "pkgset", salt=f"sharing-{uuid.uuid4().hex[:8]}")
    server = Server(work / "nixery", {"NIXERY_PKGS_PATH": str(pkgset), "NIXERY_LAYER_BUDGET": str(args.budget),
                                      "NIX_TIMEOUT": "600"})
    (work / "nixery").mkdir()
    server.start()
    oci = work / "oci"
    downloaded: dict[str, int] = {}
    per_image_fixed = 0  # root layer + config + manifest: one of each per image whatever the layering
    try:
        print(f"{'image':<58} {'layers':>6} {'new blobs':>9} {'downloaded':>12}")
        for name in CORPUS:
            before, tag = blob_sizes(oci), name.replace("/", "_")
            result = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                                     f"docker://{server.host}/{name}:latest", f"oci:{oci}:{tag}"],
                                    capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                sys.exit(f"pulling {name} failed: {result.stderr}")
            after = blob_sizes(oci)
            new = {digest: size for digest, size in after.items() if digest not in before}
            downloaded[name] = sum(new.values())
            index = json.loads((oci / "index.json").read_text())
            manifest = next(m["digest"] for m in index["manifests"]
                            if m["annotations"]["org.opencontainers.image.ref.name"] == tag).split(":")[1]
            document = json.loads((oci / "blobs/sha256" / manifest).read_bytes())
            # Nixery puts the root layer last.
            per_image_fixed += document["layers"][-1]["size"] + document["config"]["size"] + after[manifest]
            print(f"{name:<58} {len(document['layers']):>6} {len(new):>9} {downloaded[name] / 1e6:>10.2f} MB")
    finally:
        server.stop()

    # The ideal: each distinct store path of the corpus archived alone, once.
    nix = Nix(600, work / "gcroots")
    source = SourceArgs("path", str(pkgset), str(pkgset))
    closures = {}
    for name in CORPUS:
        parsed = image.parse(name, "latest")
        outputs = nix.resolve(parsed.packages, image.OPTIONAL_PACKAGES, source, parsed.arch.nix_system)
        closures[name] = (outputs, nix.closure(sorted(set(outputs.values()))))
    path_size: dict[str, int] = {}
    for _, paths in closures.values():
        for path in paths:
            if path not in path_size:
                counter = Counter()
                archive.write_layer(counter, store_paths=[path])
                path_size[path] = counter.size
    ideal = sum(path_size.values()) + per_image_fixed
    total = sum(downloaded.values())
    print(f"\n{len(CORPUS)} images, {len(path_size)} distinct store paths, budget {args.budget}, "
          f"no popularity data")
    print(f"downloaded by skopeo into one OCI layout   {total / 1e6:9.2f} MB")
    print(f"ideal (one layer per store path)           {ideal / 1e6:9.2f} MB   "
          f"(store paths {sum(path_size.values()) / 1e6:.2f} MB + per-image root layers, configs, manifests "
          f"{per_image_fixed / 1e6:.2f} MB)")
    print(f"downloaded / ideal                         {total / ideal:9.3f}   (target <= 1.15)")

    layerings = {
        "nixery": lambda outputs, paths, budget: [g.paths for g in layers.group(paths, list(outputs.values()), {}, budget)],
        "original Nixery": lambda outputs, paths, budget: upstream_layers(paths, list(outputs.values()), budget),
        "buildLayeredImage": lambda outputs, paths, budget: build_layered_image_layers(paths, budget),
    }
    print("\nestimated from per-path sizes, x ideal (no popularity data):")
    print(f"{'budget':>8} " + " ".join(f"{name:>18}" for name in layerings))
    for budget in [int(b) for b in args.estimate.split(",") if b]:
        row = []
        for layering in layerings.values():
            seen: set[tuple[str, ...]] = set()
            estimate = per_image_fixed
            for outputs, paths in closures.values():
                for group in layering(outputs, paths, budget):
                    if group not in seen:
                        seen.add(group)
                        estimate += sum(path_size[p] for p in group)
            row.append(estimate / ideal)
        print(f"{budget:>8} " + " ".join(f"{ratio:>17.3f}x" for ratio in row))


if __name__ == "__main__":
    os.environ.update(NIX_ENV)
    main()
