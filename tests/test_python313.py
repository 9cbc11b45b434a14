"""The fast test tier and one real pull on Debian trixie's Python 3.13.

The machines the suite usually runs on have Python 3.11; Debian trixie ships 3.13. In a stock
trixie container (tests/containers.py) with the Debian packages a test run needs (python3-venv,
Nix, busybox-static for the test package sets, skopeo and umoci), Nixery's requirements as
setup.py states them (with the GCS extra, which tests/test_config.py tries) are installed with pip into a virtual environment of Debian's Python, and
with it the in-process tests run, and the end-to-end test that serves with Gunicorn, builds with
Nix, pulls with skopeo and runs the image in a chroot.
"""

from __future__ import annotations

import re
import shlex

from packaging.requirements import Requirement

from containers import Container, ensure_dockerd, pip_cache, stock_image
from support import setup_py_arguments

# What the tests below need from Debian beyond a stock system (tests/containers.py).
PACKAGES = ("python3-venv", "nix-bin", "busybox-static", "skopeo", "umoci")
# The fast tier: the app in process (test_api.py) and the tests of pure modules.
FAST_TIER = ("tests/test_api.py", "tests/test_image.py", "tests/test_rootfs.py", "tests/test_archive.py",
             "tests/test_suggest.py", "tests/test_layers.py", "tests/test_config.py")
REAL_PULL = "tests/test_e2e.py::test_shell_image_runs_in_a_chroot"
# Root's single-user store in a container: no build users, and no sandbox (no namespaces allowed).
NIX_CONF = "build-users-group =\nsandbox = false\n"


def test_fast_tier_and_a_real_pull_on_trixie(tmp_path):
    ensure_dockerd()
    setup = setup_py_arguments()
    wanted = [r for r in setup["extras_require"]["test"] if Requirement(r).name in ("pytest", "requests")]
    requirements = " ".join(shlex.quote(r) for r in [*setup["install_requires"], *setup["extras_require"]["gcs"],
                                                     *wanted])
    with Container.start(stock_image("trixie", packages=PACKAGES), options=pip_cache()) as box:
        box.copy_checkout("/src")
        box.exec(f"python3 -m venv /venv && /venv/bin/python -m pip install --quiet --disable-pip-version-check "
                 f"{requirements}", timeout=900)
        assert box.exec("/venv/bin/python -c 'import sys; print(sys.version)'").stdout.startswith("3.13.")
        box.exec(f"mkdir -p /etc/nix && printf {shlex.quote(NIX_CONF)} >> /etc/nix/nix.conf")
        run = box.exec(f"/venv/bin/python -m pytest -q -p no:cacheprovider -rfEs {' '.join(FAST_TIER)} {REAL_PULL}",
                       workdir="/src", check=False, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, \
        run.stdout[-8000:]
