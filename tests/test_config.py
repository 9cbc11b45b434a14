"""Configuration: defaults, validation naming the variable, and the command line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nixery import config
from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(tmp_path):
    c = config.load({"HOME": str(tmp_path)})
    assert c.server.port == 8080 and c.layer_budget == 94 and c.nix_timeout == 60
    assert c.source == config.PackageSource(config.SourceKind.CHANNEL, "nixos-unstable")
    assert c.storage_backend == "filesystem"
    assert c.storage_path == tmp_path / ".local/share/nixery"
    assert c.popularity_url is None


def test_bounds_take_sizes_with_units(tmp_path):
    c = config.load({"HOME": str(tmp_path)})
    assert (c.limits.max_image_size, c.limits.max_packages, c.limits.eval_memory, c.limits.eval_timeout) == (1 << 30, 20, 2 << 30, 60)
    c = config.load({"HOME": str(tmp_path), "NIXERY_MAX_IMAGE_SIZE": "512m", "NIXERY_EVAL_MEMORY": "0",
                     "NIXERY_MAX_PACKAGES": "0", "NIX_TIMEOUT": "900"})
    assert (c.limits.max_image_size, c.limits.max_packages, c.limits.eval_memory, c.limits.eval_timeout) == (512 << 20, 0, 0, 900)
    assert config.load({"HOME": str(tmp_path), "NIXERY_MAX_IMAGE_SIZE": "3000"}).limits.max_image_size == 3000
    assert [config.format_size(n) for n in (900, 1536, 8388888, 2480218112)] == ["900 bytes", "1.5K", "8M", "2.31G"]


def test_channel_commits(tmp_path):
    def commits(value):
        return config.load({"HOME": str(tmp_path), "NIXERY_CHANNEL_COMMITS": value}).channel_commits
    assert config.load({"HOME": str(tmp_path)}).channel_commits is None
    assert commits("any") is None and commits("None") == ()
    assert commits(f" {'a' * 40}, {'b' * 40},{'a' * 40}") == ("a" * 40, "b" * 40)


def test_no_secret_inside_the_package_set(tmp_path):
    (tmp_path / "pkgs" / "keys").mkdir(parents=True)
    key = tmp_path / "pkgs" / "keys" / "id_ed25519"
    key.write_text("key")
    (tmp_path / "outside").write_text("key")
    env = {"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(tmp_path / "pkgs")}
    with pytest.raises(config.ConfigError, match=r"^NIXERY_SSH_KEY lies inside NIXERY_PKGS_PATH"):
        config.load({**env, "NIXERY_SSH_KEY": str(key)})
    with pytest.raises(config.ConfigError, match=r"^GOOGLE_APPLICATION_CREDENTIALS lies inside"):
        config.load({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "pkgs" / "keys" / ".." / "keys")})
    assert config.load({**env, "NIXERY_SSH_KEY": str(tmp_path / "outside")}).git.ssh_key == tmp_path / "outside"


def test_path_source_is_resolved(tmp_path):
    c = config.load({"HOME": str(tmp_path), "NIXERY_PKGS_PATH": str(tmp_path)})
    assert c.source == config.PackageSource(config.SourceKind.PATH, str(tmp_path.resolve()))


@pytest.mark.parametrize("env, variable", [
    ({"PORT": "eighty"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"NIX_TIMEOUT": "0"}, "NIX_TIMEOUT"),
    ({"NIXERY_LAYER_BUDGET": "500"}, "NIXERY_LAYER_BUDGET"),
    ({"NIXERY_STORAGE_BACKEND": "s3"}, "NIXERY_STORAGE_BACKEND"),
    ({"NIXERY_STORAGE_BACKEND": "gcs"}, "NIXERY_STORAGE_BACKEND"),
    ({"NIXERY_PKGS_PATH": "/does/not/exist"}, "NIXERY_PKGS_PATH"),
    ({"NIXERY_CHANNEL": "x", "NIXERY_PKGS_PATH": "/"}, "NIXERY_CHANNEL"),
    ({"NIXERY_CHANNEL": "bad channel"}, "NIXERY_CHANNEL"),
    ({"NIXERY_PKGS_REPO": "ftp://example/x"}, "NIXERY_PKGS_REPO"),
    ({"NIX_POPULARITY_URL": "/no/such/file.json"}, "NIX_POPULARITY_URL"),
    ({"NIXERY_CHANNEL_URL_TEMPLATE": "http://mirror/nixpkgs.tar.gz"}, "NIXERY_CHANNEL_URL_TEMPLATE"),
    ({"NIXERY_CHANNEL_URL_TEMPLATE": "http://mirror/{rev}.tar.gz http://other/"}, "NIXERY_CHANNEL_URL_TEMPLATE"),
    ({"NIXERY_CHANNEL_COMMITS": "some"}, "NIXERY_CHANNEL_COMMITS"),
    ({"NIXERY_ALLOWED_URIS": "https://ok.example/, github.com/NixOS"}, "NIXERY_ALLOWED_URIS"),
    ({"NIXERY_CHANNEL_COMMITS": "A" * 40}, "NIXERY_CHANNEL_COMMITS"),
    ({"NIXERY_LOG_LEVEL": "LOUD"}, "NIXERY_LOG_LEVEL"),
    ({"NIXERY_MAX_IMAGE_SIZE": "1.5G"}, "NIXERY_MAX_IMAGE_SIZE"),
    ({"NIXERY_MAX_IMAGE_SIZE": "2 GB"}, "NIXERY_MAX_IMAGE_SIZE"),
    ({"NIXERY_MAX_PACKAGES": "129"}, "NIXERY_MAX_PACKAGES"),
    ({"NIXERY_EVAL_MEMORY": "10M"}, "NIXERY_EVAL_MEMORY"),
    ({"NIXERY_EVAL_MEMORY": "-1"}, "NIXERY_EVAL_MEMORY"),
    ({"NIXERY_EVAL_TIMEOUT": "0"}, "NIXERY_EVAL_TIMEOUT"),
    ({"NIXERY_STORAGE_LIMIT": "lots"}, "NIXERY_STORAGE_LIMIT"),
    ({"NIXERY_STORAGE_MAX_AGE": "3w"}, "NIXERY_STORAGE_MAX_AGE"),
    ({"NIXERY_GC_INTERVAL": "-1"}, "NIXERY_GC_INTERVAL"),
    ({"NIXERY_GC_GRACE": "8d"}, "NIXERY_GC_GRACE"),
])
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(config.ConfigError, match=variable):
        config.load({"HOME": "/root", **env})


def test_a_storage_budget_is_collected_hourly_unless_told_otherwise():
    assert config.load({"HOME": "/root"}).gc == config.GcConfig(0, 0, 0, 600)
    budget = config.load({"HOME": "/root", "NIXERY_STORAGE_LIMIT": "50G", "NIXERY_STORAGE_MAX_AGE": "30d"}).gc
    assert budget == config.GcConfig(50 << 30, 30 * 86400, 3600, 600)
    assert config.load({"HOME": "/root", "NIXERY_STORAGE_MAX_AGE": "12h", "NIXERY_GC_INTERVAL": "0"}).gc.interval == 0
    assert config.load({"HOME": "/root", "NIXERY_GC_INTERVAL": "15m", "NIXERY_GC_GRACE": "90s"}).gc == \
        config.GcConfig(0, 0, 900, 90)


def test_a_bucket_without_the_gcs_extra_names_the_variable(monkeypatch):
    assert config.load({"HOME": "/root", "GCS_BUCKET": "images"}).storage_backend == "gcs"
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # as if `nixery[gcs]` were not installed
    for variable in ("GCS_BUCKET", "BUCKET"):
        with pytest.raises(config.ConfigError, match=rf"^{variable}='images' needs .*nixery\[gcs\]"):
            config.load({"HOME": "/root", variable: "images"})
    assert config.load({"HOME": "/root"}).storage_backend == "filesystem"


def test_token_in_a_url_is_redacted():
    c = config.load({"HOME": "/root", "NIXERY_PKGS_REPO": "https://user:s3cret@git.example/pkgs.git",
                     "NIXERY_GIT_TOKEN": "tok3n"})
    text = repr(c.summary())
    assert "s3cret" not in text and "tok3n" not in text
    for url in ("https://ghp_s3cret@git.example/pkgs.git", "https://git.example/pkgs.git?access_token=s3cret&x=1"):
        text = repr(config.load({"HOME": "/root", "NIXERY_PKGS_REPO": url}).summary())
        assert "s3cret" not in text and "git.example/pkgs.git" in text, text
    ssh = "ssh://git@git.example/pkgs.git"
    assert config.redact_url(ssh) == ssh, "a user name, not a secret"


def run_nixery(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NIXERY_", "NIX_", "GCS_"))}
    return subprocess.run([sys.executable, "-m", "nixery", *args], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})


def test_command_line_stops_on_a_bad_value():
    result = run_nixery(PORT="-1")
    assert result.returncode == 78  # EX_CONFIG: the NixOS unit does not restart on it
    assert "PORT" in result.stderr and "Traceback" not in result.stderr


def test_a_file_a_variable_names_that_is_not_there_yet_may_be_retried(tmp_path):
    """A missing file may yet come (a mount, a secret written late at boot): exit status 2, which
    the NixOS unit retries, not 78, which it does not."""
    for variable in ("NIXERY_PKGS_PATH", "NIXERY_SSH_KEY", "NIXERY_HTPASSWD"):
        env = {variable: str(tmp_path / "not-yet")}
        if variable == "NIXERY_HTPASSWD":
            env["NIXERY_AUTH"] = "all"
        result = run_nixery(**env)
        assert result.returncode == 2 and variable in result.stderr, (variable, result.stderr)


def test_help_describes_every_variable():
    result = run_nixery("--help")
    assert result.returncode == 0
    for variable in config.VARIABLES:
        assert variable.name in result.stdout


@pytest.mark.skipif(shutil.which("nix-build") is None,
                    reason="--check-config builds a trivial derivation, so it needs Nix (the package's "
                           "build-time tests run without)")
def test_check_config_prints_the_effective_configuration(tmp_path):
    (tmp_path / "default.nix").write_text("{ }\n")
    result = run_nixery("--check-config", NIXERY_PKGS_PATH=str(tmp_path), STORAGE_PATH=str(tmp_path / "s"),
                        NIXERY_GIT_TOKEN="tok3n", PORT=str(free_port()))
    assert result.returncode == 0, result.stderr
    assert '"kind": "path"' in result.stdout and "tok3n" not in result.stdout


def test_gunicorn_sends_blobs_with_sendfile(tmp_path, monkeypatch):
    """Gunicorn reads any value of its `sendfile` setting, True included, as --no-sendfile;
    Nixery's options must leave it on (bench/serve.py shows the cost: reads and writes of 8 KiB)."""
    from gunicorn.config import Config as GunicornConfig
    from nixery.server import gunicorn_options
    monkeypatch.delenv("SENDFILE", raising=False)
    cfg = GunicornConfig()
    for key, value in gunicorn_options(config.load({"NIXERY_PKGS_PATH": str(tmp_path)})).items():
        if key in cfg.settings:
            cfg.set(key, value)
    assert cfg.sendfile is True
