"""Suggestions for unknown names, and the systems read off Nix's `builders` setting: pure functions, no Nix."""

from __future__ import annotations

from nixery.nix import remote_builder_systems
from nixery.suggest import NameIndex, Suggestions


def test_close_names_best_first_and_only_those_nearly_as_close():
    index = NameIndex(["hello", "oldHello", "help2man", "git", "gitFull", "python3", "python312", "zstd"])
    assert index.close("hellp") == ["hello"]
    assert index.close("gti") == ["git"]
    assert index.close("PYTHON3") == ["python3"], "case is ignored, the set's spelling is given"
    assert index.close("qqqqqq") == []
    assert len(NameIndex([f"pkg{i}" for i in range(100)]).close("pkg5x")) == 3, "at most three"


def test_nested_names_keep_their_path_and_unpinned_revisions_are_listed_again():
    now = [0.0]
    suggestions = Suggestions(clock=lambda: now[0])
    suggestions.learn("pinned", True, {"": ["python3Packages", "hello"], "python3Packages": ["requests"]})
    assert suggestions.listed("pinned", True) == ["", "python3Packages"]
    assert suggestions.suggest("pinned", "python3packages.reqests", "python3Packages") == ["python3Packages.requests"]
    assert suggestions.suggest("pinned", "pyhton3packages.requests", "") == ["python3Packages.requests"]
    assert suggestions.suggest("other", "hellp", "") == [], "another revision's names are not this one's"

    suggestions.learn("path:/srv/pkgs", False, {"": ["hello"]})
    now[0] += 10_000
    assert suggestions.listed("pinned", True) == ["", "python3Packages"], "a pinned revision never changes"
    assert suggestions.listed("path:/srv/pkgs", False) == [], "a directory may have changed"


def test_remote_builder_systems(tmp_path):
    machines = tmp_path / "machines"
    machines.write_text("# comment\nssh://arm aarch64-linux,armv7l-linux /key 4\nssh://x86 - /key\n\n")
    assert remote_builder_systems("") == set()
    assert remote_builder_systems(f"@{machines}") == {"aarch64-linux", "armv7l-linux"}
    assert remote_builder_systems(f"@{tmp_path / 'missing'}") == set()
    assert remote_builder_systems("ssh://a riscv64-linux; ssh://b x86_64-darwin,aarch64-darwin") == \
        {"riscv64-linux", "x86_64-darwin", "aarch64-darwin"}
