"""The NixOS module's unit, run under a real systemd (tests/containers.py).

module.nix is evaluated with nixpkgs' real lib (as tests/test_nix_packaging.py does) and its
`systemd.services.nixery` rendered to a unit file the way NixOS renders one (render_unit), then
started in a stock Debian trixie container whose PID 1 is systemd, next to Debian's nix-daemon
(`nix-setup-systemd`, which provides `nix-daemon.socket`). skopeo pulls an image through it from
this machine, the journal is searched for anything the hardening denied, and
`systemd-analyze security` reads the hardening systemd applied.

What differs from NixOS, and why:
- ExecStart names the checkout's venv (/src/.venv/bin/nixery, made by scripts/install-deps)
  instead of the package the module names (which needs nixpkgs to build).
- `ProtectProc=invisible` is left out where `PrivateUsers` is on: in a container the pair fails
  with 217/USER (systemd issue #29656, a limit of containers, not of NixOS).
- NixOS' daemon socket is open to all and `nix.settings.allowed-users` decides (the module adds
  `nixery`); Debian's socket is the `nix-users` group's, so the user joins that group.
- The package set is tests/pkgset.py's (no nixpkgs here), under /srv or /home.
- GCS is gcp-storage-emulator, run in the container (on a port published at the same number
  on this machine, so that the redirects Nixery gives skopeo lead to it), named by
  STORAGE_EMULATOR_HOST (extraEnvironment); the library then uses anonymous credentials, so the
  credentials file (a service account's JSON key made here) is only handed over, with
  LoadCredential, and checked to be where GOOGLE_APPLICATION_CREDENTIALS points. systemd in this
  container sets up no credentials for any unit (LoadCredential= gives no $CREDENTIALS_DIRECTORY
  even to a plain `systemd-run`), so the copy is compared only where systemd can make it; the VM
  test is where LoadCredential runs for real.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from containers import BUILD_USERS_ENV, Container, ensure_dockerd, pip_cache, stock_image
from support import chroot_run, free_port, pull_and_unpack
from test_nix_packaging import module_config, needs_lib

# What the container adds to minbase: systemd as PID 1, Debian's nix-daemon and its socket, a
# Python that scripts/install-deps makes the venv with, and the package set's builder.
PACKAGES = ("systemd", "nix-setup-systemd", "python3", "python3-venv", "busybox-static")
EXEC_START = "/src/.venv/bin/nixery"
UNIT = "/etc/systemd/system/nixery.service"
# What the hardening denying something looks like in the journal.
DENIED = re.compile(r"permission denied|operation not permitted|read-only file system|could not open|"
                    r"EPERM|EACCES|SECCOMP|audit|status=2\d\d/", re.I)
# Denied and harmless: ProcSubset=pid hides /proc/stat, where the Boehm GC of the Nix client counts
# CPUs for its parallel marking; it marks with one thread instead.
TOLERATED = "GC Warning: Could not open /proc/stat"
# systemd-analyze's overall exposure (0 best, 10 worst) that the unit must stay under.
MAX_EXPOSURE = 2.5
SLOW_SECONDS = 75
BUCKET = "nixery-unit-test"
GCS_SETTINGS = {"pkgsPath": "/srv/pkgs", "storage": {"backend": "gcs"}, "bucket": BUCKET,
                "gcs": {"credentialsFile": "/run/keys/gcs.json"}}

pytestmark = needs_lib


def render_unit(service: dict, exec_start: str) -> str:
    """A unit file as NixOS writes one from `systemd.services.<name>` (nixos/lib/systemd-lib.nix:
    each list element its own `Key=` line, booleans as true/false, the environment as quoted
    `Environment=` lines), with ExecStart replaced by `exec_start`."""
    def lines(section: dict) -> list[str]:
        out = []
        for key, value in section.items():
            for item in value if isinstance(value, list) else [value]:
                rendered = ("true" if item else "false") if isinstance(item, bool) else str(item)
                out.append(f"{key}={rendered}")
        return out

    config = dict(service["serviceConfig"], ExecStart=exec_start)
    if config.get("PrivateUsers"):
        config.pop("ProtectProc")  # systemd #29656: 217/USER in a container with PrivateUsers
    unit = ["[Unit]", f"Description={service['description']}",
            f"After={' '.join(service['after'])}", f"Wants={' '.join(service.get('wants', []))}",
            f"Requires={' '.join(service['requires'])}", "", "[Service]"]
    unit += [f"Environment={json.dumps(f'{k}={v}')}" for k, v in sorted(service["environment"].items())]
    unit += lines(config)
    unit += ["", "[Install]", f"WantedBy={' '.join(service.get('wantedBy', []))}", ""]
    return "\n".join(unit)


@pytest.fixture(scope="module")
def box():
    """A systemd container with Debian's nix-daemon, Nixery's venv in /src and the package set
    in /srv/pkgs and /home/alice/pkgs (with a package that builds for SLOW_SECONDS)."""
    ensure_dockerd()
    image = stock_image("trixie", PACKAGES)
    gcs_port = free_port()
    with Container.start(image, publish=(8080, 80), systemd=True,
                         options=(*pip_cache(), "-p", f"127.0.0.1:{gcs_port}:{gcs_port}")) as container:
        container.gcs_port = gcs_port
        container.exec("for i in $(seq 100); do systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded' "
                       "&& exit 0; sleep 0.2; done; systemctl is-system-running", check=False)
        container.copy_checkout("/src")
        # No binary cache can be reached here: the daemon must not wait for one.
        container.exec("echo 'substituters =' >> /etc/nix/nix.conf && systemctl stop nix-daemon.service "
                       "&& systemctl restart nix-daemon.socket")
        # The GCS extra (install-deps adds it for a bucket), and the emulator.
        container.exec("scripts/install-deps && .venv/bin/pip install -q gcp-storage-emulator", workdir="/src",
                       env={**BUILD_USERS_ENV, "GCS_BUCKET": BUCKET}, timeout=900)
        container.exec(f"systemd-run --unit gcs-emulator /src/.venv/bin/python -m gcp_storage_emulator "
                       f"-d /var/tmp/gcs start --host 0.0.0.0 --port {gcs_port} --default-bucket {BUCKET} && "
                       f"mkdir -p /run/keys && umask 077 && cat > /run/keys/gcs.json",
                       stdin=json.dumps(_service_account_key()).encode())
        container.exec("useradd --system --home-dir /var/lib/nixery --no-create-home --groups nix-users nixery "
                       "&& useradd --create-home alice && chmod 755 /home/alice")
        for directory in ("/srv/pkgs", "/home/alice/pkgs"):
            container.exec(f"/usr/bin/python3 -c 'import sys; sys.path.insert(0, \"/src/tests\"); "
                           f"from pathlib import Path; from pkgset import make_package_set; "
                           f"make_package_set(Path(\"{directory}\"), slow_seconds={SLOW_SECONDS})' "
                           f"&& chmod -R a+rX {directory}")
        yield container


def _service_account_key() -> dict:
    """A service account's JSON key, as Google's console gives one (a fresh RSA key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "test", "private_key_id": "0" * 40, "private_key": pem,
            "client_email": "nixery@test.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token"}


def start_unit(box: Container, settings: dict) -> dict:
    """Evaluates the module with `settings`, installs the rendered unit with fresh state, starts
    it and waits until it answers; returns the evaluated service."""
    config = module_config(settings)
    assert config["failed"] == []
    box.exec("systemctl stop nixery.service 2>/dev/null; rm -rf /var/lib/nixery /var/cache/nixery; "
             "journalctl --rotate -q; journalctl --vacuum-time=1s -q; true")
    box.copy_in(_tar({"nixery.service": render_unit(config, EXEC_START)}), "/etc/systemd/system")
    box.exec("systemctl daemon-reload && systemctl start nixery.service")
    _wait_for_registry(box, settings.get("port", 8080))
    return config


def _wait_for_registry(box: Container, container_port: int) -> None:
    port = box.port(container_port)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the unit did not answer:\n{journal(box)}")


def _tar(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def journal(box: Container) -> str:
    return box.exec("journalctl -u nixery.service -o cat --no-pager", check=False).stdout


def pull(box: Container, port: int, name: str, workdir: Path) -> Path:
    return pull_and_unpack(f"127.0.0.1:{box.port(port)}", name, workdir)


@pytest.mark.parametrize("settings", [
    {"pkgsPath": "/srv/pkgs"},
    {"pkgsPath": "/home/alice/pkgs"},
    {"pkgsPath": "/srv/pkgs", "port": 80},
    GCS_SETTINGS,
], ids=["defaults", "source-under-home", "port-80", "gcs-with-credentials-file"])
def test_unit_serves_a_pull_with_its_hardening(box, settings, tmp_path):
    """The rendered unit starts, serves a pull of shell/hello by skopeo from outside, and nothing
    in the journal says the hardening denied Nixery anything; systemd applied the hardening."""
    if "bucket" in settings:
        settings = {**settings, "extraEnvironment": {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{box.gcs_port}"}}
    start_unit(box, settings)
    rootfs = pull(box, settings.get("port", 8080), "shell/hello", tmp_path)
    assert chroot_run(rootfs, "/bin/hello").strip() == "Hello, world!"
    # It ran as the unit says: the service user, its limits, inside its sandbox.
    status = box.exec("systemctl show nixery.service -p MainPID -p LimitNOFILE -p TimeoutStopUSec "
                      "-p ActiveState").stdout
    assert "ActiveState=active" in status and "LimitNOFILE=65536" in status, status
    pid = re.search(r"MainPID=(\d+)", status).group(1)
    if "bucket" in settings:
        # The layers are in the bucket, and the key reached the service where its variable says.
        stored = json.loads(_get(f"http://127.0.0.1:{box.gcs_port}/storage/v1/b/{BUCKET}/o"))
        assert any(item["name"].startswith("layers/") for item in stored.get("items", [])), stored
        environ = box.exec(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
        path = next(line for line in environ if line.startswith("GOOGLE_APPLICATION_CREDENTIALS=")).split("=", 1)[1]
        assert path == "/run/credentials/nixery.service/gcs-credentials", path
        # systemd in this container sets no credentials up, for any unit (a plain `systemd-run -p
        # LoadCredential=` finds no $CREDENTIALS_DIRECTORY): compared only where systemd can.
        probe = box.exec("systemd-run --wait --pipe -q -p LoadCredential=x:/etc/hostname "
                         "sh -c 'cat $CREDENTIALS_DIRECTORY/x'", check=False)
        if probe.returncode == 0:
            box.exec(f"nsenter -t {pid} -m cmp {path} /run/keys/gcs.json")  # in the unit's mount namespace
        else:
            print("LoadCredential does not work in this container: the key's copy is not compared")
    assert box.exec(f"stat -c %U /proc/{pid}").stdout.strip() == "nixery"
    logged = journal(box)
    assert "starting nixery" in logged and '"image built"' in logged, logged[-3000:]
    denied = [line for line in logged.replace(TOLERATED, "").splitlines() if DENIED.search(line)]
    assert not denied, "\n".join(denied)
    if settings["pkgsPath"].startswith("/home/"):
        # ProtectHome=tmpfs hides the rest of /home; the source is bound in.
        hidden = box.exec(f"nsenter -t {pid} -m ls -A /home/alice").stdout.split()
        assert hidden == ["pkgs"], hidden

    report = json.loads(box.exec("systemd-analyze security --json=short --no-pager nixery.service").stdout)
    checks = {item["name"]: item for item in report}
    # ProtectHome=tmpfs (a source under /home bound in) counts as partly set.
    protect_home = () if settings["pkgsPath"].startswith("/home/") else ("ProtectHome=",)
    unset = [name for name in (*protect_home, "ProtectSystem=", "NoNewPrivileges=", "SystemCallFilter=~@privileged",
                               "RestrictNamespaces=~user", "ProtectKernelTunables=", "PrivateDevices=",
                               "RestrictAddressFamilies=~AF_PACKET")
             if name in checks and not checks[name]["set"]]
    assert not unset, unset
    assert checks["PrivateUsers="]["set"] is (settings.get("port", 8080) >= 1024)
    overall = box.exec("systemd-analyze security --no-pager nixery.service | tail -1").stdout
    exposure = float(re.search(r"exposure level for nixery.service: ([\d.]+)", overall).group(1))
    print(f"{settings}: {overall.strip()}")
    assert exposure <= MAX_EXPOSURE, overall


def test_the_gc_unit_collects_by_hand_with_the_services_settings(box, tmp_path):
    """`systemctl start nixery-gc` runs `nixery gc` once as the service would: its user, its
    sandbox, its storage and state (the name the image was pulled as is in the state database),
    while the service runs; a pull within the grace period is kept."""
    config = start_unit(box, {"pkgsPath": "/srv/pkgs", "storage": {"maxAge": "30d"}})
    pull(box, 8080, "shell/hello", tmp_path)
    box.copy_in(_tar({"nixery-gc.service": render_unit(config["gcService"], f"{EXEC_START} gc")}),
                "/etc/systemd/system")
    box.exec("systemctl daemon-reload && systemctl start nixery-gc.service", timeout=300)
    state = box.exec("systemctl show nixery-gc.service -p Result -p User").stdout
    logged = box.exec("journalctl -u nixery-gc.service -o cat --no-pager", check=False).stdout
    assert "Result=success" in state and "User=nixery" in state, f"{state}\n{logged}"
    assert re.search(r"^kept \S+ \(shell/hello:latest\)", logged, re.M), logged
    assert "removed 0 images" in logged and "kept 1 images" in logged, logged
    assert "ActiveState=active" in box.exec("systemctl show nixery.service -p ActiveState").stdout


def test_a_mistake_in_the_settings_fails_the_unit_once_and_a_passing_failure_is_retried(box):
    """An unknown NIXERY_ name stops Nixery with EX_CONFIG (78): the unit stays failed after one
    start, its reason the journal's last line, instead of restarting every RestartSec for ever. The
    port taken by another program (exit status 2, which may pass) is tried again, and once the port
    is free the unit serves without anyone's help."""
    config = module_config({"pkgsPath": "/srv/pkgs", "extraEnvironment": {"NIXERY_PKG_PATH": "/srv/pkgs"}})
    assert config["failed"] == []
    assert config["serviceConfig"]["RestartPreventExitStatus"] == 78
    box.exec("systemctl stop nixery.service 2>/dev/null; systemctl reset-failed nixery.service 2>/dev/null; "
             "journalctl --rotate -q; journalctl --vacuum-time=1s -q; true")
    box.copy_in(_tar({"nixery.service": render_unit(config, EXEC_START)}), "/etc/systemd/system")
    box.exec("systemctl daemon-reload && systemctl start nixery.service", check=False)
    time.sleep(3 * config["serviceConfig"]["RestartSec"])  # time for two restarts, were there any
    state = box.exec("systemctl show nixery.service -p ActiveState -p NRestarts -p ExecMainStatus").stdout
    logged = journal(box)
    assert "ActiveState=failed" in state and "NRestarts=0" in state and "ExecMainStatus=78" in state, \
        f"{state}\n{logged[-3000:]}"
    assert "NIXERY_PKG_PATH is not a Nixery variable; did you mean NIXERY_PKGS_PATH?" in logged, logged[-3000:]

    # The port held by another program: exit status 2, and systemd starts it again until it serves.
    config = module_config({"pkgsPath": "/srv/pkgs"})
    box.exec("systemctl reset-failed nixery.service; journalctl --rotate -q; journalctl --vacuum-time=1s -q; true")
    box.copy_in(_tar({"nixery.service": render_unit(config, EXEC_START)}), "/etc/systemd/system")
    box.exec("systemd-run --unit port-holder /src/.venv/bin/python -c "
             "'import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
             "s.bind((\"0.0.0.0\", 8080)); s.listen(); time.sleep(3600)'")
    try:
        box.exec("sleep 1 && systemctl daemon-reload && systemctl start nixery.service", check=False)
        deadline = time.monotonic() + 60
        while "NRestarts=0" in box.exec("systemctl show nixery.service -p NRestarts").stdout:
            assert time.monotonic() < deadline, journal(box)[-3000:]
            time.sleep(1)
    finally:
        box.exec("systemctl stop port-holder.service", check=False)
    _wait_for_registry(box, 8080)
    assert "is in use by another program" in journal(box)


def test_stop_during_a_long_build_lets_it_finish(box, tmp_path):
    """With nixTimeout = 120, a build of SLOW_SECONDS (> 60 s, the old fixed TimeoutStopSec)
    running when the unit is stopped finishes: Nixery stores the image and exits by itself
    (systemd neither kills it at the stop timeout nor signals the Nix client: KillMode=mixed),
    and once started again the unit serves the image without running the build again.
    (That the waiting client's next requests are answered by the stopping server is shown in
    tests/test_container_image.py's rollout test.)"""
    start_unit(box, {"pkgsPath": "/srv/pkgs", "nixTimeout": 120})
    assert "TimeoutStopUSec=2min 30s" in box.exec("systemctl show nixery.service -p TimeoutStopUSec").stdout
    base = f"http://127.0.0.1:{box.port(8080)}"
    waiting = threading.Thread(target=_get, args=(f"{base}/v2/slowbuild/manifests/latest",), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 60
    while not json.loads(_get(f"{base}/builds.json"))["in_progress"]:
        assert time.monotonic() < deadline, journal(box)
        time.sleep(0.5)
    started = time.monotonic()
    box.exec("systemctl stop nixery.service", timeout=300)
    stopped = time.monotonic() - started
    logged = journal(box)
    state = box.exec("systemctl show nixery.service -p Result").stdout
    # Nixery ended by itself (Result=success), not killed at the stop timeout, after the build.
    assert "Result=success" in state, f"{state}\n{logged[-6000:]}"
    built = [json.loads(line) for line in logged.splitlines() if '"image built"' in line]
    assert [(entry["image"], entry["outcome"]) for entry in built] == [("slowbuild", "built")], logged[-6000:]
    assert 60 < stopped < 150, stopped
    print(f"stop during a {SLOW_SECONDS}s build took {stopped:.1f}s")

    box.exec("systemctl start nixery.service")
    _wait_for_registry(box, 8080)
    rootfs = pull(box, 8080, "slowbuild", tmp_path)
    assert chroot_run(rootfs, "/bin/slow-done").strip() == "slow-done"
    # The slow derivation's output was kept: the restarted unit makes the image without its build.
    restarted = journal(box).rsplit("Started nixery.service", 1)[1]
    rebuilt = [entry for entry in map(json.loads, re.findall(r'^\{.*"image built".*\}$', restarted, re.M))
               if entry["steps"]["build"] >= SLOW_SECONDS / 2]
    assert not rebuilt, rebuilt


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=300) as answer:
            return answer.read().decode()
    except OSError as failed:
        return str(failed)
