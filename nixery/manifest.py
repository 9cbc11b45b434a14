"""Docker schema 2 manifests and image configs, as pure functions of their parts.

Each document is serialised once; the bytes returned are the bytes hashed,
stored and served, so a manifest fetched by tag and by digest are identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Mapping, Optional, Sequence

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_LIST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
# The single-image type each multi-platform type lists.
ENTRY_MEDIA_TYPES = {MANIFEST_LIST_MEDIA_TYPE: MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE: OCI_MANIFEST_MEDIA_TYPE}
# Layer annotations that nix-snapshotter reads (its docs/architecture.md, "Image manifest"):
# it mounts these store paths from the node's Nix store instead of unpacking the layer.
NIX_LAYER_ANNOTATION = "containerd.io/snapshot/nix-layer"
NIX_STORE_PATH_ANNOTATION = "containerd.io/snapshot/nix-store-path.{}"
# Fixed so that the same contents give the same config digest on every build.
CREATED = "1970-01-01T00:00:01Z"
DEFAULT_PATH = "/bin:/usr/bin:/sbin:/usr/sbin"
# The one digest algorithm Nixery names blobs with (storage keys are built from it).
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
# Bump when the same closure would give another config or manifest (users, labels, history),
# so that cached manifests of pinned images are built again.
IMAGE_VERSION = "nixery-image-v3"
PACKAGES_LABEL = "dev.nixery.packages"
SOURCE_LABEL = "org.opencontainers.image.source"
REVISION_LABEL = "org.opencontainers.image.revision"
ROOT_LAYER_HISTORY = ("nixery root layer: /bin, /etc, /lib, ... as symlinks into the packages; "
                      "/etc/passwd, /etc/group, /tmp")


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()


def nix_layer_annotations(store_paths: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """nix-snapshotter's annotations for a layer holding exactly `store_paths`."""
    return ((NIX_LAYER_ANNOTATION, "true"),
            *((NIX_STORE_PATH_ANNOTATION.format(i), path) for i, path in enumerate(sorted(store_paths))))


def digest_of(data: bytes) -> str:
    """The OCI digest of `data`: what a document or blob is stored and asked for by."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Document:
    """Serialised JSON with the digest of exactly those bytes."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))


def _serialise(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def json_document(media_type: str, value: object) -> Document:
    """Any JSON document (an SBOM, an artifact manifest), serialised as Nixery serialises all."""
    return Document(media_type, _serialise(value))


def image_config(architecture: str, diff_ids: Sequence[str], env: Sequence[str],
                 cmd: Sequence[str] = (), *, history: Optional[Sequence[str]] = None,
                 labels: Optional[Mapping[str, str]] = None, user: str = "", workdir: str = "",
                 entrypoint: Sequence[str] = (), ports: Sequence[str] = ()) -> Document:
    """The image config. `history` describes each layer (`docker history` shows it: the store
    paths a layer holds), `labels` what the image is (`docker inspect`), `user` whom it runs as,
    `ports` the "8080/tcp" ports it exposes."""
    config: dict[str, object] = {"Env": list(env)}
    if entrypoint:
        config["Entrypoint"] = list(entrypoint)
    if cmd:
        config["Cmd"] = list(cmd)
    if ports:
        config["ExposedPorts"] = {port: {} for port in ports}
    if labels:
        config["Labels"] = dict(labels)
    if user:
        config["User"] = user
    if workdir:
        config["WorkingDir"] = workdir
    described = list(history) if history is not None else ["nixery"] * len(diff_ids)
    if len(described) != len(diff_ids):
        raise ValueError("one history entry per layer")
    return Document(CONFIG_MEDIA_TYPE, _serialise({
        "architecture": architecture,
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": text, "comment": "nixery"} for text in described],
    }))


@dataclasses.dataclass(frozen=True)
class ImageUser:
    """Whom an image runs as (None: root): its uid (also its gid) and home."""

    uid: int
    home: str


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the image runs, where a declared image (nixery/declared.py) or the package's
    `meta.mainProgram` says more than the defaults: `cmd` None keeps the default command,
    `env` entries (NAME=value) replace the defaults of the same name, `user` is numeric ids
    ("uid[:gid]") where the image has no account for them."""

    cmd: Optional[Sequence[str]] = None
    entrypoint: Sequence[str] = ()
    env: Sequence[str] = ()
    workdir: str = ""
    user: str = ""
    ports: Sequence[str] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


def nixery_config(architecture: str, diff_ids: Sequence[str], layer_paths: Sequence[Sequence[str]],
                  packages: Sequence[str], *, shell: bool, cert_file: str = "", user: Optional[ImageUser] = None,
                  source_url: Optional[str] = None, revision: Optional[str] = None,
                  run: RunConfig = RunConfig()) -> Document:
    """The config of a Nixery image: PATH (SSL_CERT_FILE when it holds a CA bundle, HOME when it
    runs as a user), bash as its command for `shell`, labels naming the requested `packages` and
    the source's URL and revision, and a history entry per layer naming the store paths it holds
    (`layer_paths`), the root layer's last; `run` adds to or replaces these."""
    env = {"PATH": DEFAULT_PATH}
    if cert_file:
        env["SSL_CERT_FILE"] = cert_file
    if user:
        env["HOME"] = user.home
    env.update(entry.split("=", 1) for entry in run.env)
    labels = dict(run.labels)
    labels[PACKAGES_LABEL] = ",".join(packages)
    if source_url:
        labels[SOURCE_LABEL] = source_url
    if revision:
        labels[REVISION_LABEL] = revision
    cmd = run.cmd if run.cmd is not None else (["bash"] if shell else [])
    return image_config(architecture, diff_ids, [f"{name}={value}" for name, value in env.items()], cmd,
                        history=[" ".join(paths) for paths in layer_paths] + [ROOT_LAYER_HISTORY], labels=labels,
                        user=f"{user.uid}:{user.uid}" if user else run.user,
                        workdir=run.workdir or (user.home if user else ""),
                        entrypoint=run.entrypoint, ports=run.ports)


def _describe(d: Descriptor) -> dict[str, object]:
    described: dict[str, object] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        described["annotations"] = dict(d.annotations)
    return described


def image_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> Document:
    return Document(MANIFEST_MEDIA_TYPE, _serialise({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _describe(config),
        "layers": [_describe(layer) for layer in layers],
    }))


def as_oci(docker: Document) -> Document:
    """The same image for a client that takes only OCI manifests: the same config and layer
    blobs (Docker's image config is a valid OCI config), named with OCI media types."""
    source = json.loads(docker.data)

    def describe(entry: dict, media_type: str) -> dict[str, object]:
        return {**entry, "mediaType": media_type}

    return Document(OCI_MANIFEST_MEDIA_TYPE, _serialise({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": describe(source["config"], OCI_CONFIG_MEDIA_TYPE),
        "layers": [describe(layer, OCI_LAYER_MEDIA_TYPE) for layer in source["layers"]],
    }))


def image_index(media_type: str, entries: Sequence[tuple[Descriptor, str]]) -> Document:
    """A Docker manifest list or OCI image index of (manifest, Docker architecture) pairs,
    listed in the given order (the configured platforms' order)."""
    return Document(media_type, _serialise({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [{**_describe(d), "platform": {"architecture": arch, "os": "linux"}} for d, arch in entries],
    }))
