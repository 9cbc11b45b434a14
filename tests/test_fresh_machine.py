"""The README's serve command on a machine as Debian leaves it: Nix installed from
`nix-bin`, but no `nixbld` group, no build users, no /etc/nix and an empty store.

That state is made in a private mount namespace (a copy of /etc without Nix's users
bound over /etc, a tmpfs over /nix), so the real machine is untouched. In it the test
first shows that Nix cannot build (the state really is fresh), then runs
`scripts/serve` exactly as the README says, pulls an image with skopeo from outside
and runs it in a chroot. Without the install step's Nix set-up, the pull fails.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import requests

from support import NIX_ENV, ROOT, chroot_run, free_port, pull_and_unpack

FRESH_MACHINE = """
set -e
cp -a /etc {tmp}/etc
for f in group gshadow passwd shadow; do sed -i '/^nixbld/d' {tmp}/etc/$f; done
rm -rf {tmp}/etc/nix
# The uids the real machine's build users have belong to other accounts here, so that the build
# users made in this state get others: Nix kills every process of a build user's uid before it
# builds as it, and this state's builds must not kill those of the real store's.
for i in $(seq 1 32); do echo "taken$i:x:$((30000 + i)):65534::/nonexistent:/usr/sbin/nologin" >> {tmp}/etc/passwd; done
mount --bind {tmp}/etc /etc
mount -t tmpfs tmpfs /nix
if getent group nixbld >/dev/null || [ -e /etc/nix ] || [ -n "$(ls -A /nix)" ]; then
  echo "FRESH-STATE-NOT-MADE"; exit 1
fi
if nix-build {probe} --no-out-link --option substituters '' >/dev/null 2>&1; then
  echo "NIX-BUILDS-WITHOUT-SET-UP"; exit 1
fi
echo "fresh machine state made"
exec scripts/serve
"""


def test_serve_on_a_fresh_machine(tmp_path):
    # The README's offline example, word for word (the empty store makes every path new).
    pkgs = tmp_path / "pkgs"
    subprocess.run([str(ROOT / "scripts" / "example-pkgset"), str(pkgs)], check=True, timeout=300)
    real_groups = Path("/etc/group").read_bytes()
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIXERY_", "GCS_", "BUCKET"))}
    env.update(NIX_ENV, PORT=str(port), NIXERY_LISTEN_ADDRESS="127.0.0.1", NIXERY_PKGS_PATH=str(pkgs),
               STORAGE_PATH=str(tmp_path / "storage"), NIXERY_STATE_DIR=str(tmp_path / "state"))
    script = FRESH_MACHINE.format(tmp=shlex.quote(str(tmp_path)),
                                  probe=shlex.quote(str(ROOT / "nixery" / "nix" / "preflight.nix")))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"scripts/serve exited with {proc.returncode}:\n{log_path.read_text()}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"scripts/serve did not start:\n{log_path.read_text()}")
        text = log_path.read_text()
        assert "fresh machine state made" in text
        assert "setup-nix: created group nixbld" in text and "setup-nix: wrote /etc/nix/nix.conf" in text

        (tmp_path / "pull").mkdir()
        rootfs = pull_and_unpack(f"127.0.0.1:{port}", "shell/hello", tmp_path / "pull")
        assert chroot_run(rootfs, "/bin/hello").strip() == "Hello, world!"
        assert chroot_run(rootfs, "/bin/sh", "-c", "echo from-sh").strip() == "from-sh"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    assert Path("/etc/group").read_bytes() == real_groups, "the real machine's /etc was changed"
