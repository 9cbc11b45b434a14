"""The README's quick start on stock Debian, as a new user has it: a minbase bookworm or trixie
(Debian's smallest system: no Python, no pip, no Nix) with git, in a Docker container
(tests/containers.py). In it, a copy of this checkout runs the README's commands word for word:

    scripts/example-pkgset /tmp/pkgs
    NIXERY_PKGS_PATH=/tmp/pkgs NIX_CONFIG='substituters =' scripts/serve

and from outside, skopeo pulls `shell/hello` through the published port and `hello` runs, and so
does the README's `docker run --rm HOST/shell/hello hello` (the README's quick start must show
these commands). That
shows the scripts install Debian's Python (3.11 on bookworm, 3.13 on trixie) and Nix as shipped,
put Nixery in the checkout's .venv without touching the system's Python (PEP 668), and set Nix up.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from containers import BUILD_USERS_ENV, Container, ensure_dockerd, pip_cache, serve_and_pull_hello, stock_image

PORT = 8080
README_EXAMPLE_PKGSET = "scripts/example-pkgset /tmp/pkgs"
README_SERVE = "NIXERY_PKGS_PATH=/tmp/pkgs NIX_CONFIG='substituters =' scripts/serve"
README_DOCKER_RUN = "docker run --rm localhost:8080/shell/hello hello"
# The README's Development command, with pytest arguments (it passes them on): the fast tier and a
# real pull, for the container engines the container tests drive cannot run inside a container.
README_TEST = "scripts/test"
TEST_PART = "tests/test_api.py tests/test_e2e.py::test_shell_image_runs_in_a_chroot"
README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}


def test_the_readme_quick_start_is_what_runs_here():
    """The README's quick start shows the two commands this module runs, word for word, as one
    block, before the README's next section."""
    quick_start = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert f"```sh\n{README_EXAMPLE_PKGSET}\n{README_SERVE}\n```" in quick_start
    assert README_DOCKER_RUN in quick_start
    development = README.read_text().split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    assert f"```sh\n{README_TEST} " in development


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_quick_start_on_stock_debian(suite, tmp_path):
    ensure_dockerd()
    with Container.start(stock_image(suite), publish=(PORT,), options=pip_cache()) as box:
        # Stock: git, and neither Python nor Nix.
        box.exec("command -v git && ! command -v python3 && ! command -v nix-build && [ ! -e /nix ]")
        box.copy_checkout("/src")
        box.exec(README_EXAMPLE_PKGSET, workdir="/src", env=BUILD_USERS_ENV)
        assert box.exec("id -u nixbld1").stdout.strip() == BUILD_USERS_ENV["NIX_FIRST_BUILD_UID"]
        serve_and_pull_hello(box, README_SERVE, PORT, tmp_path)
        # The README's docker run, with this machine's Docker, through the published port.
        docker_run = README_DOCKER_RUN.replace("localhost:8080", f"127.0.0.1:{box.port(PORT)}").split()
        ran = subprocess.run(docker_run, capture_output=True, text=True, timeout=300)
        assert ran.stdout.strip() == "Hello, world!", ran.stderr

        # Nixery runs from the checkout's .venv, made with Debian's own Python, whose system
        # site-packages stay as Debian left them (no pip, nothing of Nixery's).
        venv = box.exec("readlink -f .venv/bin/python; .venv/bin/python -c 'import sys; print(sys.version)';"
                        " .venv/bin/nixery --version", workdir="/src").stdout.splitlines()
        assert venv[0].startswith("/usr/bin/python3"), venv
        assert venv[1].startswith(PYTHON[suite] + "."), venv
        assert box.exec("/usr/bin/python3 -c 'import falcon'", check=False).returncode != 0
        assert box.exec("/usr/bin/python3 -m pip --version", check=False).returncode != 0
        # Running the command again changes nothing: no apt, no pip.
        again = box.exec("scripts/install-deps", workdir="/src").stdout
        assert "installing" not in again and "making" not in again, again


def test_the_development_command_on_stock_debian(tmp_path):
    """The README's Development command on a stock bookworm: `scripts/test` installs what the suite
    needs (Debian's packages for the tests, Nix, the .venv with the test extras) and runs pytest in
    it, here on a part of the suite."""
    ensure_dockerd()
    with Container.start(stock_image("bookworm"), options=pip_cache()) as box:
        box.copy_checkout("/src")
        run = box.exec(f"{README_TEST} -p no:cacheprovider {TEST_PART}", workdir="/src", env=BUILD_USERS_ENV,
                       timeout=1500, check=False)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        assert run.returncode == 0 and "passed" in summary and "skipped" not in summary, run.stdout[-6000:]


def test_systems_without_apt_are_told_what_to_do():
    """Where apt is missing the scripts stop with what to do instead, not with "command not found"."""
    ensure_dockerd()
    with Container.start(stock_image("bookworm")) as box:
        box.copy_checkout("/src")
        box.exec("mv /usr/bin/apt-get /usr/bin/apt-get.off")
        other = box.exec("scripts/serve", workdir="/src", check=False)
        assert other.returncode == 1, other.stdout
        assert "nix-bin python3 python3-venv" in other.stdout and "install with apt" in other.stdout, other.stdout

        box.exec("touch /etc/NIXOS")  # how NixOS marks itself (and what its own tools test)
        nixos = box.exec("scripts/serve", workdir="/src", check=False)
        assert nixos.returncode == 1, nixos.stdout
        assert "NixOS module" in nixos.stdout and "services.nixery" in nixos.stdout and "nix run" in nixos.stdout

