"""A Nix that is there already is used, not doubled, on stock Debian (tests/containers.py).

Debian's nix-daemon on a trixie, used by a user who is not root: a user who runs `scripts/serve`
before root has installed anything is told what root must run. Root installs what needs root, as
docs/install.md ("Without root") says: Debian's nix-daemon (`nix-setup-systemd`, whose socket
only the `nix-users` group may use), then `scripts/example-pkgset`, which runs
`scripts/install-deps`. The daemon is started
as its systemd unit would start it. Then a user in `nix-users` runs `scripts/serve` and skopeo
pulls `shell/hello` from outside, and a user not in the group is stopped before serving by the
preflight's one line, which names the group.

A Nix in the official installer's profile, not on PATH, on a bookworm: the scripts find it and
install no Debian Nix beside it.
"""

from __future__ import annotations

import json

from containers import BUILD_USERS_ENV, Container, ensure_dockerd, pip_cache, serve_and_pull_hello, stock_image

PORT = 8080
README_SERVE = "NIXERY_PKGS_PATH=/tmp/pkgs NIX_CONFIG='substituters =' scripts/serve"
ROOT_INSTALL = """
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-setup-systemd >/dev/null
useradd --create-home --groups nix-users alice
"""
SERVE = "NIXERY_PKGS_PATH=/srv/pkgs NIX_CONFIG='substituters =' /src/scripts/serve"


def test_a_user_in_nix_users_serves_with_the_daemon(tmp_path):
    ensure_dockerd()
    with Container.start(stock_image("trixie"), publish=(PORT,), options=pip_cache()) as box:
        box.copy_checkout("/src")
        box.exec("useradd --create-home bob")
        # Before root has installed anything, a user is told what root must run, and nothing changes.
        early = box.exec(SERVE, user="bob", workdir="/home/bob", check=False)
        assert early.returncode == 1, early.stdout
        assert ("missing Debian packages: nix-bin python3 python3-venv. As root, run: /src/scripts/install-deps;"
                in early.stdout), early.stdout
        assert not box.exec("ls -A /src/.venv /nix 2>/dev/null || true").stdout

        box.exec(ROOT_INSTALL)
        daemon_log = tmp_path / "nix-daemon.log"
        box.spawn("exec nix-daemon", daemon_log)  # ExecStart of Debian's nix-daemon.service
        box.exec("for i in $(seq 100); do [ -S /nix/var/nix/daemon-socket/socket ] && exit 0; sleep 0.1; done; exit 1")
        installed = box.exec("scripts/example-pkgset /srv/pkgs", workdir="/src").stdout
        assert "nix-bin" not in installed, "Debian's Nix came with the daemon: none installed beside it"
        assert "setup-nix: a nix-daemon is running" in installed, installed

        # Not in nix-users: the preflight stops start-up with exit 2 and names the group.
        refused = box.exec(SERVE, user="bob", workdir="/home/bob", check=False)
        lines = [line for line in refused.stdout.splitlines() if line.startswith("nixery: ")]
        assert refused.returncode == 2 and len(lines) == 1, refused.stdout
        assert "nix-users" in lines[0] and "permission denied" in lines[0] and "adduser bob" in lines[0], lines[0]

        # In nix-users: serves, building through the daemon (the store is root's).
        log = serve_and_pull_hello(box, SERVE, PORT, tmp_path, user="alice", cwd="/home/alice")
        started = json.loads(next(line for line in log.read_text().splitlines() if "starting nixery" in line))
        assert started["config"]["storage_path"] == "/home/alice/.local/share/nixery"
        assert box.exec("stat -c %U /nix/store /nix/var/nix/db").stdout.split() == ["root", "root"]


# A Nix installed outside Debian's packages, as the official installer leaves it: its commands in
# /nix/var/nix/profiles/default/bin, which a root shell's PATH does not hold (the installer adds
# it in /etc/profile.d, which `sudo` and services do not read). Debian's nix-bin's files stand in
# for the installer's, unpacked there and not installed as a package.
FOREIGN_NIX = """
apt-get update -qq
cd /tmp && apt-get download -qq nix-bin
DEBIAN_FRONTEND=noninteractive apt-get satisfy -y -qq --no-install-recommends "$(dpkg-deb -f nix-bin_*.deb Depends)" >/dev/null
dpkg-deb -x nix-bin_*.deb /tmp/nix-files
mkdir -p /nix/var/nix/profiles/default /usr/libexec/nix
cp -a /tmp/nix-files/usr/bin /nix/var/nix/profiles/default/bin
# Where Debian's build looks for its libraries and its remote-build hook.
cp -a /tmp/nix-files/usr/lib/nix /usr/lib/nix
ln -s /nix/var/nix/profiles/default/bin/nix /usr/libexec/nix/build-remote
! command -v nix-build
"""


def test_an_installed_nix_is_used_not_doubled(tmp_path):
    ensure_dockerd()
    with Container.start(stock_image("bookworm"), publish=(PORT,), options=pip_cache()) as box:
        box.exec(FOREIGN_NIX)
        box.copy_checkout("/src")
        installed = box.exec("scripts/example-pkgset /tmp/pkgs", workdir="/src", env=BUILD_USERS_ENV).stdout
        assert "installing Debian packages: python3 python3-venv\n" in installed, installed
        assert box.exec("dpkg-query -W -f='${Status}' nix-bin", check=False).stdout.find("ok installed") < 0
        serve_and_pull_hello(box, README_SERVE, PORT, tmp_path)
