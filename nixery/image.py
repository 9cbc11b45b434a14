"""Image names: from a repository name and tag to the packages Nix must build.

The name is the content, so two names that ask for the same packages (in any
order, with duplicates, with or without meta-packages spelt out) must give the
same `Image`, and the same image digest. The one exception is a name of one
plain component, which the package set may declare as an image of its own
(nixery/declared.py): `web` is keyed apart from `web/web`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from .manifest import SHA256_RE

# The distribution spec's grammar (spec.md, "Pulling manifests").
NAME_RE = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

MAX_NAME_LENGTH = 255

META_PACKAGES: dict[str, tuple[str, ...]] = {
    "shell": ("bashInteractive", "coreutils", "moreutils", "nano"),
}
# Meta-packages that change how the image runs rather than what it holds.
NONROOT = "nonroot"
# Added to every image where the package set has them: TLS roots and
# /etc/services / /etc/protocols are what users expect of a base system.
OPTIONAL_PACKAGES: tuple[str, ...] = ("cacert", "iana-etc")


@dataclasses.dataclass(frozen=True)
class Architecture:
    nix_system: str
    docker_arch: str


AMD64 = Architecture("x86_64-linux", "amd64")
ARM64 = Architecture("aarch64-linux", "arm64")
ARCH_META = {"arm64": ARM64}
# The platforms images can be offered for (NIXERY_PLATFORMS; config.PLATFORM_NAMES are its keys), by OCI name
# and by Nix system.
PLATFORMS = {"linux/amd64": AMD64, "linux/arm64": ARM64}
BY_SYSTEM = {arch.nix_system: arch for arch in PLATFORMS.values()}


def platforms_for(systems: Sequence[str]) -> tuple[Architecture, ...]:
    """The platforms of the Nix systems an instance builds for (NIXERY_PLATFORMS' default), in
    Nix's order; systems images are not offered for (i686-linux, x86_64-v3-linux) are left out."""
    return tuple(dict.fromkeys(BY_SYSTEM[s] for s in systems if s in BY_SYSTEM)) or (AMD64,)


@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    tag: str
    packages: tuple[str, ...]
    arch: Architecture
    shell: bool
    # Runs as the unprivileged `nonroot` user (the `nonroot` meta-package).
    nonroot: bool = False
    # The name chose the architecture (`arm64/...`): never offered as a multi-platform index.
    arch_given: bool = False
    # The name a package set may declare this image under (nixery/declared.py): the name's one
    # component after `arm64/`, when it has one and it is not a meta-package; else "".
    declarable: str = ""

    @property
    def key(self) -> str:
        """What makes two requests the same build, whatever the name's spelling. A name that may be
        declared is its own key: `web` may be a declared image where `web/web` is the package."""
        user = "|nonroot" if self.nonroot else ""
        declared = f"|declarable={self.declarable}" if self.declarable else ""
        return f"{self.arch.nix_system}|{self.tag}|{','.join(self.packages)}{user}{declared}"


class InvalidName(ValueError):
    """A repository name outside the spec's grammar, or one that asks for no packages."""

    def __init__(self, name: str, message: str = "invalid repository name"):
        super().__init__(message)
        self.name = name


class InvalidTag(ValueError):
    def __init__(self, tag: str):
        super().__init__("manifest tag did not match URI")
        self.tag = tag


class InvalidDigest(ValueError):
    def __init__(self, digest: str):
        super().__init__("provided digest did not match uploaded content")
        self.digest = digest


class TooManyComponents(ValueError):
    """A name of more components than NIXERY_MAX_PACKAGES allows."""

    def __init__(self, components: int, limit: int):
        super().__init__(f"the name has {components} components; this instance builds images of at most "
                         f"{limit} (NIXERY_MAX_PACKAGES)")
        self.components = components
        self.limit = limit


def validate_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise InvalidName(name)


def validate_tag(tag: str) -> None:
    if not TAG_RE.fullmatch(tag):
        raise InvalidTag(tag)


def validate_digest(digest: str) -> bool:
    """True for a sha256 digest Nixery may hold; False for a well-formed digest of another
    algorithm (it cannot be here); raises DIGEST_INVALID for anything else."""
    if SHA256_RE.fullmatch(digest):
        return True
    if DIGEST_RE.fullmatch(digest) and not digest.startswith("sha256:"):
        return False
    raise InvalidDigest(digest)


def parse(name: str, tag: str, max_components: int = 0) -> Image:
    """Split a repository name into packages; leading components may be meta-packages.
    A name of more than `max_components` components (NIXERY_MAX_PACKAGES; 0: any number) is
    refused here, before anything is evaluated: each package costs evaluation, building and a layer."""
    validate_name(name)
    validate_tag(tag)
    components = name.split("/")
    if max_components and len(components) > max_components:
        raise TooManyComponents(len(components), max_components)
    arch = AMD64
    arch_given = shell = nonroot = False
    packages: list[str] = []
    leading = True
    for component in components:
        if leading and component in ARCH_META:
            arch = ARCH_META[component]
            arch_given = True
            continue
        if leading and component == NONROOT:
            nonroot = True
            continue
        if leading and component in META_PACKAGES:
            shell = shell or component == "shell"
            packages.extend(META_PACKAGES[component])
            continue
        leading = False
        packages.append(component)
    if not packages:
        raise InvalidName(name, "the name asks for no packages")
    plain = [c for c in components if c not in ARCH_META]
    declarable = plain[0] if len(plain) == 1 and packages == plain else ""
    return Image(name=name, tag=tag, packages=tuple(sorted(set(packages))), arch=arch, shell=shell,
                 nonroot=nonroot, arch_given=arch_given, declarable=declarable)
