"""`nixery build NAME[:TAG]`: the image a pull would give, written to a file or directory.

Three formats, named as skopeo names them:
- `docker-archive`: a tar `docker load` reads (its manifest.json), which is also an
  OCI layout, as Docker 25's `docker save` writes; one platform only, as a
  Docker image has one.
- `oci-archive`: a tar of an OCI image layout.
- `oci`: an OCI image layout directory (made, or added to: other images in it stay).
Blobs are the stored ones, byte for byte (layers stay compressed; `docker load`
decompresses them), so the digests are those a pull gets. The index names the
image by its tag (`org.opencontainers.image.ref.name`), as skopeo's `oci:DIR:TAG`
reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from . import config as configuration
from .atomic import write_atomic
from .local import CommandError, LocalImage, built
from .manifest import MANIFEST_LIST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE, Document, as_oci

FORMATS = ("docker-archive", "oci-archive", "oci")
REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
# Archive members carry no time (the same image gives the same archive).
MTIME = 0
COPY_CHUNK = 1 << 20


def _blob_path(digest: str) -> str:
    algorithm, hexdigest = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexdigest}"


def _index_entry(top: Document, tag: str) -> dict[str, object]:
    return {"mediaType": top.media_type, "digest": top.digest, "size": len(top.data),
            "annotations": {REF_NAME: tag}}


def _index(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": entries}, indent=1).encode()


def _docker_manifest(image: LocalImage) -> bytes:
    """manifest.json, the list `docker load` reads: the config and layers of the one image, and its name."""
    parsed = json.loads(image.manifests[0].data)
    return json.dumps([{"Config": _blob_path(parsed["config"]["digest"]),
                        "RepoTags": [f"{image.name}:{image.tag}"],
                        "Layers": [_blob_path(layer["digest"]) for layer in parsed["layers"]]}]).encode()


def _member(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.type = size, MTIME, kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def write_archive(image: LocalImage, out: BinaryIO, docker: bool) -> None:
    """The image as a tar, streamed (`out` may be a pipe): the OCI layout, and for `docker` manifest.json."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        def small(name: str, data: bytes) -> None:
            tar.addfile(_member(name, len(data)), io.BytesIO(data))

        # OCI readers (skopeo, containerd) take only OCI manifests from an index: a Docker
        # archive's index names the OCI form of its manifest (the one a pull by an OCI client gets).
        top = as_oci(image.top) if docker else image.top
        small("oci-layout", OCI_LAYOUT)
        small("index.json", _index([_index_entry(top, image.tag)]))
        if docker:
            small("manifest.json", _docker_manifest(image))
        for directory in ("blobs", "blobs/sha256"):
            tar.addfile(_member(directory, 0, tarfile.DIRTYPE))
        for document in dict.fromkeys((top, *image.manifests)):
            small(_blob_path(document.digest), document.data)
        for blob in image.blobs:
            with image.reading(blob) as content:
                tar.addfile(_member(_blob_path(blob.digest), blob.size), content)


def write_layout(image: LocalImage, directory: Path) -> None:
    """The image into an OCI layout directory: blobs it holds already are kept, and the index
    entry of the same tag replaced; the index is written last, so a reader never sees a tag whose
    blobs are missing."""
    if directory.exists() and any(directory.iterdir()) and not (directory / "oci-layout").is_file():
        raise CommandError(f"{directory} is neither empty nor an OCI layout")
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = directory / "blobs"
    write_atomic(directory / "oci-layout", OCI_LAYOUT, tmp)
    for document in dict.fromkeys((image.top, *image.manifests)):
        write_atomic(directory / _blob_path(document.digest), document.data, tmp)
    for blob in image.blobs:
        path = directory / _blob_path(blob.digest)
        if path.is_file() and path.stat().st_size == blob.size:
            continue
        with _replacing(path) as f, image.reading(blob) as content:
            shutil.copyfileobj(content, f, COPY_CHUNK)
    index_path = directory / "index.json"
    entries = json.loads(index_path.read_text())["manifests"] if index_path.is_file() else []
    entries = [e for e in entries if e.get("annotations", {}).get(REF_NAME) != image.tag]
    write_atomic(index_path, _index([*entries, _index_entry(image.top, image.tag)]), tmp)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A file written beside `path` and renamed into place once whole; removed if writing fails."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            yield f
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """The file to write (`-`: standard output, unless a terminal)."""
    if path == "-":
        if sys.stdout.isatty():
            raise CommandError("refusing to write an image archive to a terminal: give -o FILE or redirect")
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with _replacing(Path(path)) as f:
        yield f


def export(config: configuration.Config, reference: str, fmt: str, output: str, platform: Optional[str],
           store: bool) -> LocalImage:
    if fmt == "docker-archive" and platform and (platform == "all" or "," in platform):
        raise CommandError("a Docker archive holds one platform: choose one with --platform, "
                           "or write an oci-archive or oci layout")
    if fmt == "oci" and output == "-":
        raise CommandError("an OCI layout is a directory: give it with -o DIR")
    media_type = MANIFEST_LIST_MEDIA_TYPE if fmt == "docker-archive" else OCI_INDEX_MEDIA_TYPE
    with built(config, reference, media_type, platform=platform, store=store) as image:
        if fmt == "oci":
            write_layout(image, Path(output))
        else:
            with _output(output) as out:
                write_archive(image, out, docker=fmt == "docker-archive")
        return image


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nixery build",
        description="Builds the image a pull of NAME[:TAG] gives (the same digests, from the same configuration "
                    "variables as the server) and writes it as an archive or OCI layout, without a server.")
    parser.add_argument("reference", metavar="NAME[:TAG]", help="the image, as pulled: shell/git, arm64/hello:v2")
    parser.add_argument("-o", "--output", default="-",
                        help="file (directory for --format oci) to write; - (the default): standard output")
    parser.add_argument("--format", choices=FORMATS, default="docker-archive",
                        help="docker-archive (docker load; also an OCI archive), oci-archive, or oci (a layout "
                             "directory); default: docker-archive")
    parser.add_argument("--platform", metavar="OS/ARCH[,...]|all",
                        help="platform(s) to build for, among those configured (default: the first, this "
                             "machine's); several, or all, give an index (OCI formats only)")
    parser.add_argument("--store", action="store_true",
                        help="also write what is built to the configured storage (STORAGE_PATH or the bucket), "
                             "as the server would; by default it is only read from")
    args = parser.parse_args(argv)
    from .cli import run
    return run("build", lambda config: _report(export(config, args.reference, args.format, args.output,
                                                      args.platform, args.store), args.output))


def _report(image: LocalImage, output: str) -> None:
    where = "standard output" if output == "-" else output
    print(f"nixery build: {image.name}:{image.tag} {image.top.digest} written to {where} ({image.describe()})",
          file=sys.stderr)
