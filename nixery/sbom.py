"""Software bills of materials, attached to images through the OCI 1.1 referrers API.

`GET /v2/<name>/referrers/<digest>` of an image manifest lists one artifact: an
SPDX 2.3 JSON document naming every store path of the image's closure (name,
version, store path). It is made when first asked for, from the image config's
history (which names each layer's store paths), so it needs no Nix and no
record of the build: any instance holding the manifest makes byte-identical
documents, and stores them like any other blob.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from . import manifest
from .storage import Backend, blob_key

ARTIFACT_TYPE = "application/spdx+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = manifest.Document(EMPTY_MEDIA_TYPE, b"{}")
# A store path as the config's history names it: /<store>/<32 base-32 characters>-<name>.
_STORE_PATH_RE = re.compile(r"/[^\s]+/([0-9a-df-np-sv-z]{32})-([^\s/]+)")
# Nix's parseDrvName: the version starts after the first dash that is not followed by a letter.
_VERSION_RE = re.compile(r"-(?![A-Za-z])")


def split_name(name: str) -> tuple[str, str]:
    """("python3.12-requests", "2.32.3") from "python3.12-requests-2.32.3", as Nix splits it."""
    match = _VERSION_RE.search(name)
    return (name[:match.start()], name[match.end():]) if match else (name, "")


def store_paths(config: dict) -> list[str]:
    """The store paths the image's layers hold, as its history names them."""
    paths = set()
    for entry in config.get("history", []):
        paths.update(m.group(0) for m in _STORE_PATH_RE.finditer(entry.get("created_by", "")))
    return sorted(paths)


def spdx(subject: manifest.Descriptor, config: dict) -> manifest.Document:
    """The SPDX document of the image whose manifest is `subject` and config `config`."""
    packages, relationships = [], []
    for path in store_paths(config):
        match = _STORE_PATH_RE.fullmatch(path)
        assert match
        name, version = split_name(match.group(2))
        package = {"SPDXID": f"SPDXRef-Package-{match.group(1)}", "name": name, "downloadLocation": "NOASSERTION",
                   "filesAnalyzed": False, "packageFileName": path}
        if version:
            package["versionInfo"] = version
        packages.append(package)
        relationships.append({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                              "relatedSpdxElement": package["SPDXID"]})
    hex_digest = subject.digest.split(":", 1)[1]
    return manifest.json_document(ARTIFACT_TYPE, {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"closure of image {subject.digest}",
        "documentNamespace": f"urn:nixery:spdx:{hex_digest}",
        "creationInfo": {"created": manifest.CREATED, "creators": ["Tool: nixery"]},
        "packages": packages,
        "relationships": relationships,
    })


def _artifact(sbom: manifest.Document, subject: manifest.Descriptor) -> manifest.Document:
    """The OCI 1.1 artifact manifest carrying `sbom`, whose `subject` is the image."""
    def describe(d: manifest.Descriptor) -> dict[str, object]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}

    return manifest.json_document(manifest.OCI_MANIFEST_MEDIA_TYPE, {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {**describe(EMPTY.descriptor()), "data": "e30="},
        "layers": [describe(sbom.descriptor())],
        "subject": describe(subject),
        "annotations": {"org.opencontainers.image.created": manifest.CREATED},
    })


def _image(storage: Backend, digest: str) -> Optional[tuple[manifest.Descriptor, dict]]:
    """The image manifest `digest` names and its config, or None (unknown, an index, an artifact)."""
    info = storage.stat(blob_key(digest))
    if info is None or info.media_type not in (manifest.MANIFEST_MEDIA_TYPE, manifest.OCI_MANIFEST_MEDIA_TYPE):
        return None
    data = storage.read(blob_key(digest))
    if data is None:
        return None
    document = json.loads(data)
    if "artifactType" in document or "subject" in document:
        return None
    config = storage.read(blob_key(document["config"]["digest"]))
    if config is None:
        return None
    return manifest.Descriptor(info.media_type, digest, len(data)), json.loads(config)


def referrers(storage: Backend, digest: Optional[str], artifact_type: Optional[str] = None) -> manifest.Document:
    """The OCI image index of the artifacts that refer to `digest`: its SBOM when `digest` is an
    image manifest held here (made and stored on the first request), else none. The spec wants an
    empty index, not a 404, for a digest with no referrers."""
    entries = []
    image = _image(storage, digest) if digest else None
    if image is not None and artifact_type in (None, ARTIFACT_TYPE):
        subject, config = image
        sbom = spdx(subject, config)
        artifact = _artifact(sbom, subject)
        for document in (EMPTY, sbom, artifact):
            storage.put_if_absent(blob_key(document.digest), document.data, document.media_type)
        entries.append({"mediaType": artifact.media_type, "digest": artifact.digest, "size": len(artifact.data),
                        "artifactType": ARTIFACT_TYPE,
                        "annotations": {"org.opencontainers.image.created": manifest.CREATED}})
    return manifest.json_document(manifest.OCI_INDEX_MEDIA_TYPE, {
        "schemaVersion": 2, "mediaType": manifest.OCI_INDEX_MEDIA_TYPE, "manifests": entries})
