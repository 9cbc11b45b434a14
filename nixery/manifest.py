"""Docker schema 2 manifests and image configs, as pure functions of their parts.

Each document is serialised once; the bytes returned are the bytes hashed,
stored and served, so a manifest fetched by tag and by digest are identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Sequence

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# Fixed so that the same contents give the same config digest on every build.
CREATED = "1970-01-01T00:00:01Z"
DEFAULT_PATH = "/bin:/usr/bin:/sbin:/usr/sbin"
# The one digest algorithm Nixery names blobs with (storage keys are built from it).
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclasses.dataclass(frozen=True)
class Document:
    """Serialised JSON with the digest of exactly those bytes."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))


def _serialise(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image_config(architecture: str, diff_ids: Sequence[str], env: Sequence[str],
                 cmd: Sequence[str] = ()) -> Document:
    config: dict[str, object] = {"Env": list(env)}
    if cmd:
        config["Cmd"] = list(cmd)
    return Document(CONFIG_MEDIA_TYPE, _serialise({
        "architecture": architecture,
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": "nixery"} for _ in diff_ids],
    }))


def image_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> Document:
    def describe(d: Descriptor) -> dict[str, object]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}

    return Document(MANIFEST_MEDIA_TYPE, _serialise({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": describe(config),
        "layers": [describe(layer) for layer in layers],
    }))


def as_oci(docker: Document) -> Document:
    """The same image for a client that takes only OCI manifests: the same config and layer
    blobs (Docker's image config is a valid OCI config), named with OCI media types."""
    source = json.loads(docker.data)

    def describe(entry: dict, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": entry["digest"], "size": entry["size"]}

    return Document(OCI_MANIFEST_MEDIA_TYPE, _serialise({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": describe(source["config"], OCI_CONFIG_MEDIA_TYPE),
        "layers": [describe(layer, OCI_LAYER_MEDIA_TYPE) for layer in source["layers"]],
    }))
