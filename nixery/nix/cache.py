"""A Nix binary cache shared by instances (NIXERY_BINARY_CACHE).

Instances behind one load balancer share storage, so a manifest or layer made
by one is found by all. Their Nix stores are separate, though: without this,
each builds again what another already built. So, after a successful build,
the closure is copied to a binary cache with `nix copy` (signed with this
instance's key), and every build uses the cache as an extra substituter: a
path another instance built is downloaded instead of built.

Paths are trusted by signature only; `require-sigs` is never turned off,
since whoever can write to a shared bucket could otherwise put any store path
into every image. Under a nix-daemon the cache must also be in the daemon's
`trusted-substituters` and its key in `trusted-public-keys` (the NixOS module
does this), because a daemon ignores substituters an untrusted user names.
"""

from __future__ import annotations

from typing import Sequence

from ..config import BinaryCacheConfig

# zstd: several times xz's speed (Nix's default) at a similar size, and Nix 2.8 reads it.
COMPRESSION = "zstd"


def substituter_options(cache: BinaryCacheConfig) -> list[str]:
    """Options for nix-build that add the cache as a substituter and trust its key."""
    return ["--option", "extra-substituters", cache.url,
            "--option", "extra-trusted-public-keys", cache.public_key]


def copy_command(cache: BinaryCacheConfig, paths: Sequence[str]) -> list[str]:
    """`nix copy` of `paths` (and their closures) to the cache, signed with the secret key."""
    assert cache.secret_key is not None, "a read-only cache is never written"
    separator = "&" if "?" in cache.url else "?"
    url = f"{cache.url}{separator}secret-key={cache.secret_key}&compression={COMPRESSION}"
    return ["nix", "--extra-experimental-features", "nix-command", "copy", "--to", url, *paths]
