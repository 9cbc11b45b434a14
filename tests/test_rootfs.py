"""The root layer's symlink tree, from fake store paths (no Nix needed)."""

from nixery.rootfs import root_entries


def make(tmp_path, name, files):
    root = tmp_path / f"store/aaaa-{name}"
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(name)
    return str(root)


def test_merge_follows_buildenv(tmp_path):
    coreutils = make(tmp_path, "coreutils", ["bin/env", "bin/ls", "share/man/man1/ls.1"])
    bash = make(tmp_path, "bash", ["bin/bash", "bin/ls", "share/man/man1/bash.1", "tmp/junk", "lib/bash/x"])
    entries = {e.name: e for e in root_entries({"coreutils": coreutils, "bash": bash})}
    assert entries["bin"].kind == "dir"  # top-level directories are always real
    assert entries["bin/ls"].target == f"{coreutils}/bin/ls"  # first listed package wins
    assert entries["bin/bash"].target == f"{bash}/bin/bash"
    assert entries["share/man"].kind == "dir"  # provided by both: merged
    assert entries["share/man/man1"].kind == "dir"
    assert entries["lib/bash"].kind == "symlink" and entries["lib/bash"].target == f"{bash}/lib/bash"
    assert entries["usr/bin/env"].target == f"{coreutils}/bin/env"
    # A package's own tmp/ never replaces the image's world-writable /tmp.
    assert [e.mode for e in root_entries({"bash": bash}) if e.name == "tmp"] == [0o1777]
    assert "tmp/junk" not in entries


def test_no_env_without_coreutils(tmp_path):
    hello = make(tmp_path, "hello", ["bin/hello"])
    names = {e.name for e in root_entries({"hello": hello})}
    assert "usr/bin/env" not in names and "bin/hello" in names


def test_accounts_unless_a_package_brings_its_own(tmp_path):
    hello = make(tmp_path, "hello", ["bin/hello"])
    entries = {e.name: e for e in root_entries({"hello": hello})}
    assert entries["etc/passwd"].kind == "file"
    assert entries["etc/passwd"].content == ("root:x:0:0:root:/root:/bin/sh\n"
                                             "nobody:x:65534:65534:nobody:/var/empty:/bin/false\n")
    assert {"etc/group", "etc/shadow", "etc/nsswitch.conf", "root"} <= set(entries)
    assert "home/nonroot" not in entries
    # A package with its own /etc/passwd keeps it; the other files are still added.
    users = make(tmp_path, "users", ["etc/passwd"])
    entries = {e.name: e for e in root_entries({"users": users, "hello": hello}, nonroot=True)}
    assert entries["etc/passwd"].kind == "symlink" and entries["etc/passwd"].target == f"{users}/etc/passwd"
    assert "nonroot:x:65532:" in entries["etc/group"].content
    home = entries["home/nonroot"]
    assert (home.kind, home.uid, home.gid) == ("dir", 65532, 65532)
