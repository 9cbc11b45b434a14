"""Declared images: named images a package set declares with their packages and configuration.

A package set may hold `nixery-images.nix` next to its default.nix (docs/declared-images.md),
which names images and gives each its packages and what `docker run` does with it:

    { pkgs, ... }: {
      web = {
        packages = [ "busybox" "hello" ];
        Cmd = [ "httpd" "-f" "-p" "8080" ];
        Env = { GREETING = "hi"; };
        ExposedPorts = [ "8080/tcp" ];
        User = "nonroot";
      };
    }

The declarations are the set's code, which a tag selects: Nix hands them over as plain data
(helper.nix's `toData`), and this module checks every field's type and size before any of it
reaches an image config. A declaration that is not valid is refused naming the image and the
field (`InvalidDeclaration`), never served in part.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from . import rootfs
from .image import ARCH_META, META_PACKAGES, NAME_RE, NONROOT, Image
from .manifest import PACKAGES_LABEL, REVISION_LABEL, SOURCE_LABEL, RunConfig

# Docker's config fields a declaration may set, and the other keys it may have.
FIELDS = ("Cmd", "Entrypoint", "Env", "WorkingDir", "User", "ExposedPorts", "Labels")
OTHER_KEYS = ("packages", "description")
# Bounds on what the set's code may put into an image config.
MAX_PACKAGES = 256
MAX_ITEMS = 256  # arguments, variables, ports, labels
MAX_STRING = 4096  # any one string
MAX_TOTAL = 256 * 1024  # all the strings of one declaration
MAX_DESCRIPTION = 500
SHOWN_MAX = 100  # of a name or word of the set's in an error message
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PORT_RE = re.compile(r"([0-9]{1,5})(/(tcp|udp|sctp))?")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
# A package name as in an image name: the set's attribute path, dots reaching nested sets.
PACKAGE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
# `User`: a user the image's /etc/passwd names, or numeric ids (which need no entry).
NUMERIC_USER_RE = re.compile(r"([0-9]{1,10})(:[0-9]{1,10})?")
NAMED_USERS = {"root": rootfs.ROOT, "nonroot": rootfs.NONROOT}
# Labels the service sets itself: a declaration must not forge where an image comes from.
RESERVED_LABELS = (PACKAGES_LABEL, SOURCE_LABEL, REVISION_LABEL)


class InvalidDeclaration(ValueError):
    """The set's declaration of `image` is not valid: `field` says where, the message why."""

    def __init__(self, image: str, field: str, reason: str):
        super().__init__(f"the package set's declaration of image {image} is invalid: {field}: {reason}")
        self.image = image
        self.field = field


@dataclasses.dataclass(frozen=True)
class Declaration:
    """A checked declaration. `env` holds NAME=value entries; `user` is None (root, the default),
    the named `rootfs.User` the image gets an account for, or numeric "uid[:gid]"."""

    name: str
    packages: tuple[str, ...]
    cmd: Optional[tuple[str, ...]] = None
    entrypoint: Optional[tuple[str, ...]] = None
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: Optional[rootfs.User | str] = None
    ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    description: str = ""


def _what(value: object) -> str:
    """How a value of the wrong type is named in an error: helper.nix marks what is not data."""
    if isinstance(value, dict) and isinstance(value.get("__invalid"), str) and len(value) == 1:
        return value["__invalid"][:SHOWN_MAX]  # helper.nix's words, unless the set's code wrote its own
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an attribute set", type(None): "null"}.get(type(value), type(value).__name__)


class _Checker:
    """Checks one declaration's values, counting the bytes of all its strings."""

    def __init__(self, image: str):
        self.image = image
        self.total = 0

    def fail(self, field: str, reason: str) -> InvalidDeclaration:
        return InvalidDeclaration(self.image, field, reason)

    def string(self, field: str, value: object, limit: int = MAX_STRING) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, not {_what(value)}")
        if "\0" in value:
            raise self.fail(field, "must not contain a NUL character")
        size = len(value.encode())
        if size > limit:
            raise self.fail(field, f"is {size} bytes long, more than {limit}")
        self.total += size
        if self.total > MAX_TOTAL:
            raise self.fail(field, f"the declaration's strings take more than {MAX_TOTAL} bytes")
        return value

    def items(self, field: str, value: object, kind: type, limit: int = MAX_ITEMS) -> list | dict:
        if not isinstance(value, kind) or (isinstance(value, dict) and _what(value) != "an attribute set"):
            raise self.fail(field, f"must be {'a list' if kind is list else 'an attribute set'}, not {_what(value)}")
        if len(value) > limit:
            raise self.fail(field, f"has {len(value)} entries, more than {limit}")
        return value

    def strings(self, field: str, value: object) -> tuple[str, ...]:
        return tuple(self.string(f"{field}[{i}]", item) for i, item in enumerate(self.items(field, value, list)))


def parse(image: str, raw: object) -> Declaration:
    """The declaration of `image` from the set's raw data, or InvalidDeclaration naming the field."""
    check = _Checker(image)
    spec = check.items("declaration", raw, dict, len(FIELDS) + len(OTHER_KEYS))
    unknown = sorted(key for key in spec if key not in FIELDS and key not in OTHER_KEYS)
    if unknown:
        raise check.fail(unknown[0][:SHOWN_MAX], f"is not a field of a declared image (they are {', '.join(OTHER_KEYS + FIELDS)})")
    if "packages" not in spec:
        raise check.fail("packages", "is missing: a declared image lists its packages")
    items = check.items("packages", spec["packages"], list, MAX_PACKAGES)
    for i, item in enumerate(items):
        if _what(item) == "a derivation":
            raise check.fail(f"packages[{i}]", "is a derivation, not a name: name the package as in an image "
                                                "name (\"nginx\", \"python3Packages.requests\")")
    packages = check.strings("packages", items)
    if not packages:
        raise check.fail("packages", "is empty: a declared image lists at least one package")
    for i, package in enumerate(packages):
        if not PACKAGE_RE.fullmatch(package):
            raise check.fail(f"packages[{i}]", f"{package!r} is not a package name of the set")
    return Declaration(
        name=image,
        packages=tuple(dict.fromkeys(packages)),
        cmd=check.strings("Cmd", spec["Cmd"]) if "Cmd" in spec else None,
        entrypoint=check.strings("Entrypoint", spec["Entrypoint"]) if "Entrypoint" in spec else None,
        env=_env(check, spec.get("Env", {})),
        workdir=_workdir(check, spec["WorkingDir"]) if "WorkingDir" in spec else "",
        user=_user(check, spec["User"]) if "User" in spec else None,
        ports=_ports(check, spec.get("ExposedPorts", [])),
        labels=_labels(check, spec.get("Labels", {})),
        description=check.string("description", spec.get("description", ""), MAX_DESCRIPTION),
    )


def _env(check: _Checker, value: object) -> tuple[str, ...]:
    """`Env = { NAME = "value"; }`, as NAME=value entries sorted by name."""
    env = check.items("Env", value, dict)
    for name in env:
        if not ENV_NAME_RE.fullmatch(name) or len(name) > 256:
            raise check.fail(f"Env.{name[:SHOWN_MAX]}", "is not a valid variable name")
    return tuple(f"{name}={check.string(f'Env.{name}', env[name])}" for name in sorted(env))


def _workdir(check: _Checker, value: object) -> str:
    path = check.string("WorkingDir", value)
    if not path.startswith("/"):
        raise check.fail("WorkingDir", f"{path!r} is not an absolute path")
    return path


def _user(check: _Checker, value: object) -> rootfs.User | str | None:
    """`root`, `nonroot` (uid 65532, the account the `nonroot` meta-package adds), or numeric ids."""
    user = check.string("User", value, 64)
    if user in NAMED_USERS:
        named = NAMED_USERS[user]
        return None if named is rootfs.ROOT else named
    if NUMERIC_USER_RE.fullmatch(user):
        return user
    raise check.fail("User", f"{user!r} is neither root, nonroot nor numeric ids (uid or uid:gid): "
                             "the image's /etc/passwd names no other user")


def _ports(check: _Checker, value: object) -> tuple[str, ...]:
    """`ExposedPorts = [ 8080 "53/udp" ]`, as Docker's "8080/tcp" keys."""
    ports = []
    for i, port in enumerate(check.items("ExposedPorts", value, list)):
        text = str(port) if isinstance(port, int) and not isinstance(port, bool) else check.string(
            f"ExposedPorts[{i}]", port, 16)
        match = PORT_RE.fullmatch(text)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise check.fail(f"ExposedPorts[{i}]", f"{text!r} is not a port (1-65535, optionally /tcp, /udp or /sctp)")
        ports.append(f"{int(match.group(1))}/{match.group(3) or 'tcp'}")
    return tuple(sorted(set(ports)))


def _labels(check: _Checker, value: object) -> tuple[tuple[str, str], ...]:
    labels = check.items("Labels", value, dict)
    for name in labels:
        if not LABEL_RE.fullmatch(name) or len(name) > 256:
            raise check.fail(f"Labels.{name[:SHOWN_MAX]}", "is not a valid label name")
        if name in RESERVED_LABELS:
            raise check.fail(f"Labels.{name}", "is set by Nixery itself")
    return tuple((name, check.string(f"Labels.{name}", labels[name])) for name in sorted(labels))


def contents(image: Image, declaration: Optional[Declaration]) -> Image:
    """What the build of `image` holds: the declaration's packages and user where the set declares
    it (the name's own package, `web`, is not built then: a declared name wins)."""
    if declaration is None:
        return image
    return dataclasses.replace(image, packages=declaration.packages, shell=False,
                               nonroot=declaration.user is rootfs.NONROOT)


def run_config(declaration: Declaration) -> RunConfig:
    """The declared command, environment, ports and the rest, for the image config."""
    return RunConfig(cmd=declaration.cmd, entrypoint=declaration.entrypoint or (), env=declaration.env,
                     workdir=declaration.workdir, user=declaration.user if isinstance(declaration.user, str) else "",
                     ports=declaration.ports, labels=dict(declaration.labels))


@dataclasses.dataclass(frozen=True)
class Listed:
    """A declared image as the page and /declared.json show it; `error` when it cannot be served."""

    name: str
    packages: tuple[str, ...] = ()
    description: str = ""
    error: str = ""

    def as_json(self) -> dict[str, object]:
        """As /declared.json and /packages.json list it: {"name", "packages", "description"}, or {"name", "error"}."""
        if self.error:
            return {"name": self.name, "error": self.error}
        return {"name": self.name, "packages": list(self.packages), "description": self.description}


def listing(raw: object) -> list[Listed]:
    """The declared images of helper.nix's `declared` output, each checked as far as a list shows
    it (its packages and description; the rest is checked when it is pulled). An image whose name
    cannot be pulled (not a registry name, or more than one component) is listed with an error."""
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), dict):
        error = raw.get("error") if isinstance(raw, dict) else None
        return [Listed("nixery-images.nix", error=str(error or "not readable")[:MAX_DESCRIPTION])]
    listed = []
    for name in sorted(raw["images"])[:MAX_ITEMS]:
        spec = raw["images"][name]
        shown = name[:SHOWN_MAX]
        if not (NAME_RE.fullmatch(name) and "/" not in name and len(name) <= 128):
            listed.append(Listed(shown, error="not a valid image name (one lower-case component)"))
            continue
        if name in META_PACKAGES or name in ARCH_META or name == NONROOT:
            listed.append(Listed(name, error="the name of a meta-package, which a pull of it means instead"))
            continue
        try:
            declaration = parse(name, {"packages": spec.get("packages"), "description": spec.get("description", "")}
                                if _what(spec) == "an attribute set" else spec)
        except InvalidDeclaration as e:
            listed.append(Listed(name, error=str(e)))
            continue
        listed.append(Listed(name, declaration.packages, declaration.description))
    return listed
