"""Image names: validation, meta-packages, order and duplicates."""

from typing import Callable

import pytest

from nixery import image
from nixery.error_handlers import as_registry_error
from nixery.errors import RegistryError


def test_meta_packages_expand_and_order_does_not_matter():
    a = image.parse("shell/git/htop", "latest")
    b = image.parse("shell/htop/git/git", "latest")
    assert a.packages == b.packages == ("bashInteractive", "coreutils", "git", "htop", "moreutils", "nano")
    assert a.key == b.key and a.shell and a.arch == image.AMD64


def test_arm64_switches_the_target():
    img = image.parse("arm64/shell/hello", "latest")
    assert img.arch.nix_system == "aarch64-linux" and img.arch.docker_arch == "arm64"
    assert "arm64" not in img.packages and img.key != image.parse("shell/hello", "latest").key


def test_meta_packages_only_lead():
    assert image.parse("hello/shell", "latest").packages == ("hello", "shell")


def test_dotted_names_are_kept_whole():
    assert image.parse("python3packages.requests", "latest").packages == ("python3packages.requests",)


def test_tag_is_part_of_the_key():
    assert image.parse("hello", "latest").key != image.parse("hello", "v1").key


def told(call: Callable[[], object]) -> RegistryError:
    """What a client is told of the error `call` raises (image.py raises its own; the HTTP layer translates)."""
    with pytest.raises(Exception) as raised:
        call()
    return as_registry_error(raised.value)


@pytest.mark.parametrize("name", ["Hello", "a//b", "/a", "a/", "a..b", "-a", "a/../b", "a" * 256, "arm64"])
def test_invalid_names(name):
    error = told(lambda: image.parse(name, "latest"))
    assert error.code == "NAME_INVALID" and error.status == 400


@pytest.mark.parametrize("tag", [".x", "-x", "a" * 129, "a/b", ""])
def test_invalid_tags(tag):
    error = told(lambda: image.parse("hello", tag))
    assert error.code == "TAG_INVALID"


def test_digests():
    assert image.validate_digest("sha256:" + "a" * 64) is True
    assert image.validate_digest("sha512:" + "a" * 128) is False
    for bad in ("sha256:" + "a" * 63, "sha256:" + "A" * 64, "sha256:../x", "nocolon", "sha256:"):
        error = told(lambda: image.validate_digest(bad))
        assert error.code == "DIGEST_INVALID"
