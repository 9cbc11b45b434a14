"""The builder's decisions on their own (nixery/admission.py), without Nix: what is served
without building, what is refused and why, and which failures are answered from memory."""

from __future__ import annotations

import pytest

from nixery import error_handlers, manifest
from nixery.admission import Admission
from nixery.config import BuildLimits, StateLayout
from nixery.errors import RegistryError
from nixery.image import parse
from nixery.nix import SourceArgs
from nixery.refusals import BuildRefused, ImageTooLarge, TooManyBuilds
from nixery.sources import Resolved
from nixery.stats import BuildStats
from nixery.storage import StorageError, blob_key
from nixery.storage.filesystem import FilesystemBackend

PINNED = Resolved.ready(SourceArgs("path", "/pkgs", "test set"), cache_key="a" * 40)
UNPINNED = Resolved.ready(SourceArgs("path", "/pkgs", "test set"), cache_key=None)


class Builds:
    """The build an admission runs: a stored manifest naming the image, counted."""

    def __init__(self, storage: FilesystemBackend):
        self.storage = storage
        self.count = 0

    def __call__(self, name: str, error: Exception | None = None):
        def build() -> manifest.Document:
            self.count += 1
            if error is not None:
                raise error
            document = manifest.json_document(manifest.MANIFEST_MEDIA_TYPE, {"image": name})
            self.storage.put_if_absent(blob_key(document.digest), document.data, document.media_type)
            return document
        return build


@pytest.fixture
def setup(tmp_path):
    storage = FilesystemBackend(tmp_path / "storage")
    return storage, StateLayout.under(tmp_path / "state"), Builds(storage)


def admission(setup, **limits) -> Admission:
    storage, state, _ = setup
    return Admission(storage, state, BuildLimits(**limits), "test-output",
                     explain=error_handlers.as_registry_error)


def test_a_pinned_image_is_built_once_then_served_from_storage_even_to_a_client_that_may_not_build(setup):
    builds = setup[2]
    gate = admission(setup)
    image = parse("hello", "latest")
    first = BuildStats(image="hello")
    built = gate.manifest(image, PINNED, first, builds("hello"))
    again = BuildStats(image="hello")
    assert gate.manifest(image, PINNED, again, builds("hello"), may_build=False) == built
    assert (builds.count, first.cached, again.cached) == (1, False, True)
    with pytest.raises(BuildRefused) as refused:
        gate.manifest(parse("other", "latest"), PINNED, BuildStats(image="other"), builds("other"), may_build=False)
    assert refused.value.name == "other" and builds.count == 1


def test_an_unpinned_image_just_built_is_served_from_the_memo(setup):
    builds = setup[2]
    gate = admission(setup)
    image = parse("hello", "latest")
    built = gate.manifest(image, UNPINNED, BuildStats(image="hello"), builds("hello"))
    stats = BuildStats(image="hello")
    assert gate.manifest(image, UNPINNED, stats, builds("hello")) == built
    assert builds.count == 1 and stats.cached


def test_a_refused_size_is_remembered_as_the_client_was_told_and_a_storage_fault_is_not(setup):
    builds = setup[2]
    gate = admission(setup, failure_ttl=60)
    big = parse("big", "latest")
    with pytest.raises(ImageTooLarge):
        gate.manifest(big, PINNED, BuildStats(image="big"), builds("big", ImageTooLarge(9 << 20, 4 << 20)))
    with pytest.raises(RegistryError) as remembered:
        gate.manifest(big, PINNED, BuildStats(image="big"), builds("big"))
    assert (remembered.value.status, remembered.value.detail) == (403, {"size": 9 << 20, "max_image_size": 4 << 20})
    assert builds.count == 1, "the remembered answer builds nothing"

    flaky = parse("flaky", "latest")
    with pytest.raises(StorageError):
        gate.manifest(flaky, PINNED, BuildStats(image="flaky"), builds("flaky", StorageError("bucket unreachable")))
    gate.manifest(flaky, PINNED, BuildStats(image="flaky"), builds("flaky"))
    assert builds.count == 3, "a storage fault is the instance's, not the image's: built again"


def test_a_client_with_its_share_of_builds_running_is_refused_another(setup):
    builds = setup[2]
    gate = admission(setup, client_builds=1, max_builds=2)

    def build_while_building() -> manifest.Document:
        with pytest.raises(TooManyBuilds) as refused:
            gate.manifest(parse("second", "latest"), PINNED, BuildStats(image="second"), builds("second"),
                          client="10.0.0.1")
        assert (refused.value.limit, refused.value.retry_after) == (1, 10)
        gate.manifest(parse("third", "latest"), PINNED, BuildStats(image="third"), builds("third"), client="10.0.0.2")
        return builds("first")()

    gate.manifest(parse("first", "latest"), PINNED, BuildStats(image="first"), build_while_building, client="10.0.0.1")
    assert builds.count == 2, "first and third: another address is not refused"
