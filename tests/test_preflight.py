"""The preflight: each problem a new machine can have stops `nixery --check-config` (and
start-up) with exit 2 and one line naming the cause and the fix, or warns.

The machine states are made for real, in a private mount namespace (`unshare --mount`),
so the real machine is untouched: an /etc without Nix's build users, an empty /nix, a
read-only Nix state directory, a read-only or full storage directory.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port

# The exit statuses are an interface (module.nix's RestartPreventExitStatus names 78), so the
# numbers are written out here rather than imported.
EXIT_CONFIG = 78
EXIT_CANNOT_SERVE = 2

ROOT = Path(__file__).resolve().parent.parent


def nixery_env(tmp_path: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NIXERY_", "NIX_", "GCS_"))}
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir(exist_ok=True)
    (pkgs / "default.nix").write_text("{ }\n")
    return {**clean, "PYTHONPATH": str(ROOT), "NIXERY_PKGS_PATH": str(pkgs), "PORT": str(free_port()),
            "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_STATE_DIR": str(tmp_path / "state"), **env}


def check_config(env: dict[str, str], setup: str = "") -> subprocess.CompletedProcess:
    """`nixery --check-config`, after `setup` (shell) in a mount namespace of its own."""
    command = f"{shlex.quote(sys.executable)} -m nixery --check-config"
    script = f"set -e\n{setup}\nexec {command}" if setup else f"exec {command}"
    return subprocess.run([shutil.which("unshare"), "--mount", "--propagation", "private", shutil.which("bash"),
                           "-c", script],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [json.loads(line)["message"] for line in result.stderr.splitlines()
            if line.startswith("{") and json.loads(line)["level"] == "WARNING"]


def fatal_line(result: subprocess.CompletedProcess, status: int = EXIT_CANNOT_SERVE) -> str:
    """The one line that stopped start-up with `status`: EXIT_CONFIG for a mistake in the
    configuration (no restart gets past it), else EXIT_CANNOT_SERVE."""
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("nixery: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_machine_that_is_set_up_passes_without_warnings(tmp_path):
    """(What the checks cost is measured by bench/preflight.py.)"""
    env = nixery_env(tmp_path)
    for _ in range(2):  # the first run may build the check's derivation; the second looks it up
        result = check_config(env)
        assert result.returncode == 0, result.stderr
        assert warnings(result) == []
        *summary, last = result.stdout.splitlines()
        assert last == "ok" and json.loads("\n".join(summary))["source"]["kind"] == "path"


def test_nix_not_on_path(tmp_path):
    result = check_config(nixery_env(tmp_path, PATH=str(tmp_path / "empty-bin")))
    line = fatal_line(result)
    assert "nix-build" in line and "not found on PATH" in line and "install-deps" in line


WITHOUT_BUILD_USERS = """
cp -a /etc {etc}
for f in group gshadow passwd shadow; do sed -i '/^nixbld/d' {etc}/$f; done
rm -rf {etc}/nix
mount --bind {etc} /etc
mount -t tmpfs tmpfs /nix
"""


def test_missing_build_users_are_named_with_the_fix(tmp_path):
    result = check_config(nixery_env(tmp_path), WITHOUT_BUILD_USERS.format(etc=tmp_path / "etc"))
    line = fatal_line(result)
    assert "build users" in line and "nixbld" in line and "scripts/install-deps" in line
    assert "specified in 'build-users-group'" not in line  # not Nix's raw text


def test_store_not_writable_and_no_daemon(tmp_path):
    setup = "mkdir -p /nix/var/nix && mount --bind /nix/var/nix /nix/var/nix && mount -o remount,ro,bind /nix/var/nix"
    line = fatal_line(check_config(nixery_env(tmp_path), setup))
    assert "Nix store is not writable" in line and "nix-daemon" in line


def _storage_dirs(storage: Path) -> str:
    return f"mkdir -p {storage}/layers {storage}/builds {storage}/manifests {storage}/tmp"


def test_read_only_storage(tmp_path):
    storage = tmp_path / "storage"
    setup = f"{_storage_dirs(storage)}\nmount --bind {storage} {storage}\nmount -o remount,ro,bind {storage}"
    line = fatal_line(check_config(nixery_env(tmp_path), setup))
    assert f"STORAGE_PATH={storage}" in line and "read-only" in line


def test_full_storage_is_a_warning(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    setup = (f"mount -t tmpfs -o size=64k tmpfs {storage}\n{_storage_dirs(storage)}\n"
             f"dd if=/dev/zero of={storage}/filler bs=4k count=64 2>/dev/null || true")
    result = check_config(nixery_env(tmp_path), setup)
    assert result.returncode == 0, result.stderr
    assert any("is full" in w and "503" in w for w in warnings(result)), result.stderr


@pytest.mark.parametrize("volume", ["tmpfs", "emptyDir", "persistent"])
def test_storage_only_this_instance_can_see_is_a_warning(tmp_path, volume):
    """STORAGE_PATH on a tmpfs, or bind-mounted from a kubelet's emptyDir directory as a pod gets
    it: start-up warns that replicas cannot share it; on a volume of its own (a bind mount from
    elsewhere, as a PersistentVolumeClaim or Docker volume is), nothing is said."""
    storage = tmp_path / "storage"
    storage.mkdir()
    source = tmp_path / {"emptyDir": "kubelet/pods/0a1b/volumes/kubernetes.io~empty-dir/state",
                         "persistent": "kubelet/pods/0a1b/volumes/kubernetes.io~csi/pvc-1/mount"}.get(volume, "")
    source.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs tmpfs {storage}" if volume == "tmpfs" else f"mount --bind {source} {storage}"
    result = check_config(nixery_env(tmp_path), f"{mount}\n{_storage_dirs(storage)}")
    assert result.returncode == 0, result.stderr
    told = [w for w in warnings(result) if f"STORAGE_PATH={storage}" in w]
    if volume == "persistent":
        assert told == [], result.stderr
    else:
        expected = "a tmpfs" if volume == "tmpfs" else "a Kubernetes emptyDir volume"
        assert len(told) == 1 and f"is on {expected}" in told[0] and "single replica" in told[0], result.stderr


def test_package_path_without_default_nix(tmp_path):
    empty = tmp_path / "empty-set"
    empty.mkdir()
    line = fatal_line(check_config(nixery_env(tmp_path, NIXERY_PKGS_PATH=str(empty))))
    assert f"NIXERY_PKGS_PATH={empty} has no default.nix" in line


def test_unreachable_git_source_is_a_warning(tmp_path):
    env = nixery_env(tmp_path, NIXERY_PKGS_REPO=f"file://{tmp_path}/no-such-repo.git")
    del env["NIXERY_PKGS_PATH"]
    result = check_config(env)
    assert result.returncode == 0, result.stderr
    assert any("NIXERY_PKGS_REPO" in w and "cannot be reached" in w for w in warnings(result)), result.stderr


@pytest.mark.parametrize("typo, meant", [("NIX_TIMOUT", "NIX_TIMEOUT"), ("GCS_BUCKT", "GCS_BUCKET")])
def test_misspelt_variables_name_the_real_one(tmp_path, typo, meant):
    """Names without NIXERY_ may be another program's: a warning."""
    result = check_config(nixery_env(tmp_path, **{typo: "1"}))
    assert result.returncode == 0, result.stderr
    assert f"{typo} is not a Nixery variable and is ignored; did you mean {meant}?" in warnings(result)


def test_unknown_nixery_variable_stops_with_the_one_meant(tmp_path):
    """The package source left at its default (nixos-unstable) by a typo is not served quietly."""
    line = fatal_line(check_config(nixery_env(tmp_path, NIXERY_PKG_PATH=str(tmp_path / "pkgs"))), EXIT_CONFIG)
    assert "NIXERY_PKG_PATH is not a Nixery variable; did you mean NIXERY_PKGS_PATH?" in line
    assert "NIXERY_IGNORE_VARIABLES" in line
    # Start-up stops the same way, before Gunicorn.
    started = subprocess.run([sys.executable, "-m", "nixery"], capture_output=True, text=True, timeout=60,
                             env=nixery_env(tmp_path, NIXERY_PKG_PATH="x"))
    assert started.returncode == EXIT_CONFIG and "did you mean NIXERY_PKGS_PATH?" in started.stderr, started.stderr
    # A variable of another program's is let through by name.
    wrapper = nixery_env(tmp_path, NIXERY_WRAPPER_MODE="blue", NIXERY_IGNORE_VARIABLES="NIXERY_WRAPPER_MODE")
    assert check_config(wrapper).returncode == 0
    assert "NIXERY_WRAPPER_MODE" in fatal_line(check_config({**wrapper, "NIXERY_IGNORE_VARIABLES": ""}), EXIT_CONFIG)


def test_package_set_that_does_not_parse_fails_with_nix_message(tmp_path):
    env = nixery_env(tmp_path)
    Path(env["NIXERY_PKGS_PATH"], "default.nix").write_text("{ system ? builtins.currentSystem }:\n{ hello = 1 }\n")
    line = fatal_line(check_config(env))
    assert f"NIXERY_PKGS_PATH={env['NIXERY_PKGS_PATH']}: the package set does not evaluate" in line
    assert "error: syntax error, unexpected '}'" in line and f"{env['NIXERY_PKGS_PATH']}/default.nix:2:13" in line
    # Start-up only warns with the same words: a server tells each pull, and the set may be fixed meanwhile.
    log = tmp_path / "start-up.log"
    with open(log, "w") as stderr:
        started = subprocess.Popen([sys.executable, "-m", "nixery"], stderr=stderr, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while '"WARNING"' not in log.read_text() and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if started.poll() is None:
            os.killpg(started.pid, signal.SIGTERM)
        started.wait(timeout=30)
    warned = json.loads(log.read_text().splitlines()[0])
    assert warned["level"] == "WARNING" and warned["message"] == line.removeprefix("nixery: ") + \
        "; pulls fail until it does", warned


def test_port_in_use_is_one_line_naming_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = nixery_env(tmp_path, PORT=str(port), NIXERY_LISTEN_ADDRESS="127.0.0.1")
        line = fatal_line(check_config(env))
        assert line == f"nixery: PORT={port}: 127.0.0.1:{port} is in use by another program: stop it, or set " \
                       "PORT to a free port"
        started = time.monotonic()
        serving = subprocess.run([sys.executable, "-m", "nixery"], capture_output=True, text=True, timeout=60,
                                 env=env)
        took = time.monotonic() - started
    assert serving.returncode == EXIT_CANNOT_SERVE and serving.stderr.strip() == line, serving.stderr
    assert took < 5, f"Gunicorn's retries take seconds; the check took {took:.1f}s"


def test_a_dry_run_beside_the_running_nixery_passes(tmp_path):
    """`nixery --check-config && systemctl restart nixery`: the instance to be restarted holds the
    port, which the dry run finds (a warning, exit 0); serving a second one there is still refused,
    as is the dry run where another program holds the port (above)."""
    env = nixery_env(tmp_path, NIXERY_LISTEN_ADDRESS="127.0.0.1", NIXERY_WORKERS="1")
    running = subprocess.Popen([sys.executable, "-m", "nixery"], env=env, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", int(env["PORT"]))) == 0:
                    break
            assert running.poll() is None and time.monotonic() < deadline, "the first instance did not start"
            time.sleep(0.2)
        checked = check_config(env)
        assert checked.returncode == 0 and checked.stdout.splitlines()[-1] == "ok", checked.stderr
        assert warnings(checked) == [f"PORT={env['PORT']}: 127.0.0.1:{env['PORT']} is held by a running Nixery; "
                                     "this configuration can serve there once that one stops (a restart)"]
        second = subprocess.run([sys.executable, "-m", "nixery"], capture_output=True, text=True, timeout=60,
                                env=env, cwd=ROOT)
        assert second.returncode == 2 and "is in use by another program" in second.stderr, second.stderr
    finally:
        os.killpg(running.pid, signal.SIGTERM)
        running.wait(timeout=60)


def test_logs_are_text_on_a_terminal(tmp_path):
    """Someone who starts Nixery in a terminal reads lines, not JSON; NIXERY_LOG_FORMAT=json keeps JSON there."""
    def on_a_terminal(**env: str) -> str:
        leader, follower = pty.openpty()
        with os.fdopen(leader, "rb", buffering=0) as terminal:
            proc = subprocess.Popen([sys.executable, "-m", "nixery", "--check-config"], stdout=subprocess.DEVNULL,
                                    stderr=follower, env=nixery_env(tmp_path, NIX_TIMOUT="1", **env))
            os.close(follower)
            proc.wait(timeout=120)
            out = b""
            while True:
                try:
                    chunk = terminal.read(65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
        return out.decode()

    text = on_a_terminal()
    assert re.search(r"^\d\d:\d\d:\d\d WARNING +NIX_TIMOUT is not a Nixery variable", text, re.MULTILINE), text
    assert "{" not in text
    as_json = [json.loads(line) for line in on_a_terminal(NIXERY_LOG_FORMAT="json").splitlines() if line.strip()]
    assert any(entry["message"].startswith("NIX_TIMOUT is not") for entry in as_json), as_json


def test_nix_own_variables_are_not_typos(tmp_path):
    result = check_config(nixery_env(tmp_path, NIX_PATH="nixpkgs=/x", NIX_REMOTE="", NIX_SSL_CERT_FILE="/x"))
    assert result.returncode == 0 and warnings(result) == [], result.stderr


def test_conflicting_storage_settings_stop(tmp_path):
    line = fatal_line(check_config(nixery_env(tmp_path, GCS_BUCKET="nixery-images",
                                              NIXERY_STORAGE_BACKEND="filesystem")), EXIT_CONFIG)
    assert "GCS_BUCKET" in line and "NIXERY_STORAGE_BACKEND=filesystem" in line
