"""The fast test tier and one real pull on Debian trixie's Python 3.13 and Gunicorn release.

The machines the suite usually runs on have Python 3.11; Debian trixie ships 3.13, and Gunicorn
23.0 (python3-gunicorn). In a stock trixie container (tests/containers.py) with the Debian
packages a test run needs (python3-venv, Nix, busybox-static for the test package sets, skopeo
and umoci), Nixery's requirements as setup.py states them (with the GCS extra, which
tests/test_config.py tries), held to the Gunicorn release of trixie's python3-gunicorn (read
from trixie's archive), are installed with pip into a virtual environment of Debian's Python. With it the in-process tests run, and the end-to-end test that
serves with Gunicorn, builds with Nix, pulls with skopeo and runs the image in a chroot.
(tests/test_gunicorn_versions.py tries the newer Gunicorns, and tests/test_fresh_machine.py serves
on trixie with the newest, as scripts/install-deps installs it.)
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
    requirements = [*setup["install_requires"], *setup["extras_require"]["gcs"], *wanted]
    with Container.start(stock_image("trixie", packages=PACKAGES), options=pip_cache()) as box:
        box.copy_checkout("/src")
        debian = box.exec("apt-get update -qq && apt-cache show --no-all-versions python3-gunicorn"
                          " | sed -n 's/^Version: //p'").stdout.strip().splitlines()[-1]
        gunicorn = re.match(r"(?:\d+:)?([\d.]+)", debian).group(1)  # 23.0.0-3 -> 23.0.0
        pinned = " ".join(shlex.quote(r) for r in [*requirements, f"gunicorn=={gunicorn}"])
        box.exec(f"python3 -m venv /venv && /venv/bin/python -m pip install --quiet --disable-pip-version-check "
                 f"{pinned}", timeout=900)
        versions = box.exec("/venv/bin/python -c 'import sys, gunicorn; print(sys.version, gunicorn.__version__)'")
        assert versions.stdout.startswith("3.13.") and versions.stdout.split()[-1] == gunicorn, versions.stdout
        box.exec(f"mkdir -p /etc/nix && printf {shlex.quote(NIX_CONF)} >> /etc/nix/nix.conf")
        run = box.exec(f"/venv/bin/python -m pytest -q -p no:cacheprovider -rfEs {' '.join(FAST_TIER)} {REAL_PULL}",
                       workdir="/src", check=False, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, \
        run.stdout[-8000:]
