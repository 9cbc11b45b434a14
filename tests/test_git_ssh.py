"""A git package set over ssh, against a real OpenSSH server on 127.0.0.1.

A module-wide `sshd -D -e` serves a bare repository to one authorized ed25519
key. Each Nixery gets its own HOME, whose .ssh holds what the test says (a
known_hosts, perhaps a default key), so the real ~/.ssh is never read or
written; SSH_AUTH_SOCK is emptied so that no agent is asked, except the test's own.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

from pkgset import make_package_set
from support import chroot_run, free_port, pull_and_unpack

SSHD = Path("/usr/sbin/sshd")
SALT = "git-ssh-test"
MARKER = "served-over-ssh"

pytestmark = pytest.mark.skipif(not SSHD.exists(), reason="openssh-server is not installed (scripts/install-deps)")


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


def public_key(private: Path) -> str:
    """`ssh-ed25519 AAAA...` without the comment."""
    return " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])


def private_key_lines(private: Path) -> list[str]:
    return [line for line in private.read_text().splitlines() if line and not line.startswith("-----")]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   check=True, capture_output=True)


@dataclasses.dataclass
class SshRemote:
    root: Path
    port: int
    bare: Path
    host_key: Path
    client_key: Path  # authorized
    wrong_key: Path  # a valid key the server does not know
    log_path: Path

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.bare}"

    def known_hosts_line(self, key: Optional[Path] = None) -> str:
        return f"[127.0.0.1]:{self.port} {public_key(key or self.host_key)}\n"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def accepted(self) -> int:
        return self.log().count("Accepted publickey for root")


def start_sshd(config: Path, log_path: Path) -> subprocess.Popen:
    # sshd running as root refuses to start without its privilege separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(log_path, "ab")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while "Server listening on" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sshd did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def ssh_remote(tmp_path_factory) -> Iterator[SshRemote]:
    real_ssh = Path.home() / ".ssh"
    before = sorted(real_ssh.rglob("*")) if real_ssh.exists() else None
    root = tmp_path_factory.mktemp("ssh")
    keys = root / "keys"
    keys.mkdir()
    host_key = keygen(keys / "host_ed25519", "host")
    client_key = keygen(keys / "client", "client")
    wrong_key = keygen(keys / "wrong", "wrong")
    authorized = root / "authorized_keys"
    authorized.write_text(public_key(client_key) + "\n")

    work = root / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    make_package_set(work, salt=SALT)
    nix = work / "default.nix"
    marker = f'in rec {{\n  sshmarker = script "sshmarker" "echo {MARKER}";'
    nix.write_text(nix.read_text().replace("in rec {", marker, 1))
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "package set")
    bare = root / "packages.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)

    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
LogLevel VERBOSE
""")
    log_path = root / "sshd.log"
    proc = start_sshd(config, log_path)
    try:
        yield SshRemote(root, port, bare, host_key, client_key, wrong_key, log_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = sorted(real_ssh.rglob("*")) if real_ssh.exists() else None
    assert before == after, "the real ~/.ssh must not be touched"


def make_home(directory: Path, known_hosts: Optional[str], default_key: Optional[Path] = None) -> Path:
    """A HOME whose .ssh holds `known_hosts` (none if None) and `default_key` as id_ed25519."""
    ssh = directory / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    if known_hosts is not None:
        (ssh / "known_hosts").write_text(known_hosts)
    if default_key:
        shutil.copy2(default_key, ssh / "id_ed25519")
        shutil.copy2(default_key.with_name(default_key.name + ".pub"), ssh / "id_ed25519.pub")
    return directory


def ssh_env(remote: SshRemote, home: Path, key: Optional[Path]) -> dict[str, str]:
    env = {"NIXERY_PKGS_REPO": remote.url, "HOME": str(home), "SSH_AUTH_SOCK": ""}
    if key:
        env["NIXERY_SSH_KEY"] = str(key)
    return env


def manifest(server, name: str, tag: str = "latest") -> requests.Response:
    return requests.get(f"{server.url}/v2/{name}/manifests/{tag}", timeout=120)


def source_error(response: requests.Response) -> str:
    """The one-line message of a 500 UNKNOWN JSON error."""
    assert response.status_code == 500, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNKNOWN" and "\n" not in error["message"], error
    return error["message"]


def test_pull_over_ssh_with_the_configured_key(ssh_remote, start_server, tmp_path):
    # A deploy key as it is usually mounted: the private half alone, outside HOME.
    deploy_key = tmp_path / "deploy-key"
    shutil.copy2(ssh_remote.client_key, deploy_key)
    home = make_home(tmp_path / "home", ssh_remote.known_hosts_line())
    accepted = ssh_remote.accepted()
    server = start_server(ssh_env(ssh_remote, home, deploy_key))
    rootfs = pull_and_unpack(server.host, "sshmarker", tmp_path)
    assert chroot_run(rootfs, "/bin/sshmarker").strip() == MARKER
    assert ssh_remote.accepted() > accepted, "the fetch went through sshd with the key"
    assert sorted(p.name for p in (home / ".ssh").iterdir()) == ["known_hosts"]


def test_a_key_the_server_does_not_know_is_refused(ssh_remote, start_server, tmp_path):
    home = make_home(tmp_path / "home", ssh_remote.known_hosts_line())
    accepted = ssh_remote.accepted()
    server = start_server(ssh_env(ssh_remote, home, ssh_remote.wrong_key))
    response = manifest(server, "sshmarker")
    assert source_error(response) == f"cannot fetch repository {ssh_remote.url}: authentication refused"
    assert ssh_remote.accepted() == accepted
    # The refusal is sshd's: the key was offered to it and turned down.
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(ssh_remote.wrong_key)], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert "Failed publickey for root from 127.0.0.1 port" in ssh_remote.log() and fingerprint in ssh_remote.log()
    failures = [e for e in server.log_entries() if e.get("message") == "git fetch failed"]
    assert failures and "authentication refused" in failures[0]["reason"]
    secrets = [*private_key_lines(ssh_remote.wrong_key), *private_key_lines(ssh_remote.client_key),
               public_key(ssh_remote.wrong_key).split()[1]]
    for secret in secrets:
        assert secret not in response.text and secret not in server.log()


def test_default_key_file_in_home_is_the_fallback(ssh_remote, start_server, tmp_path):
    home = make_home(tmp_path / "home", ssh_remote.known_hosts_line(), default_key=ssh_remote.client_key)
    accepted = ssh_remote.accepted()
    server = start_server(ssh_env(ssh_remote, home, None))
    assert manifest(server, "sshmarker").status_code == 200
    assert ssh_remote.accepted() > accepted


def test_ssh_agent_is_the_first_fallback(ssh_remote, start_server, tmp_path):
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        subprocess.run(["ssh-add", "-q", str(ssh_remote.client_key)], check=True, capture_output=True,
                       env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)})
        # The key is only in the agent: HOME has no key file, NIXERY_SSH_KEY is unset.
        home = make_home(tmp_path / "home", ssh_remote.known_hosts_line())
        accepted = ssh_remote.accepted()
        server = start_server({**ssh_env(ssh_remote, home, None), "SSH_AUTH_SOCK": str(socket_path)})
        assert manifest(server, "sshmarker").status_code == 200
        assert ssh_remote.accepted() > accepted
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=10)


def test_host_key_must_be_in_known_hosts(ssh_remote, start_server, tmp_path):
    """A host key that is unknown or differs from known_hosts fails the fetch before any login."""
    home = make_home(tmp_path / "home", None)
    known_hosts = home / ".ssh" / "known_hosts"
    server = start_server(ssh_env(ssh_remote, home, ssh_remote.client_key))
    accepted = ssh_remote.accepted()
    impostor = keygen(tmp_path / "impostor", "impostor")
    cases = {"no known_hosts": None, "empty known_hosts": "",
             "another host's key": "[127.0.0.1]:1 " + public_key(ssh_remote.host_key) + "\n",
             "a different key for this host": ssh_remote.known_hosts_line(impostor)}
    for case, content in cases.items():
        if content is not None:
            known_hosts.write_text(content)
        message = source_error(manifest(server, "sshmarker"))
        assert message == f"cannot fetch repository {ssh_remote.url}: invalid or unknown remote ssh hostkey", case
        assert ssh_remote.accepted() == accepted, f"{case}: connected and logged in anyway"
    # The same server connects once the host key is known (a failed fetch is retried at once),
    # and a hashed entry, as `ssh-keyscan -H` writes, is as good as a plain one.
    known_hosts.write_text(ssh_remote.known_hosts_line())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert "127.0.0.1" not in known_hosts.read_text()
    assert manifest(server, "sshmarker").status_code == 200
    assert ssh_remote.accepted() > accepted
