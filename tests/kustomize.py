"""deploy/kubernetes as `kubectl kustomize` renders it, and the parts of it tests read."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"


def render_documents(directory: Path) -> list[dict]:
    """Every object `kubectl kustomize directory` gives (the test fails if kubectl is missing)."""
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (it renders the kustomize base)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(directory: Path = BASE) -> dict[str, dict]:
    """The rendered objects by kind (the base has one of each)."""
    return {doc["kind"]: doc for doc in render_documents(directory)}


def container(rendered: dict[str, dict]) -> dict:
    """The Deployment's one container."""
    (only,) = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def settings(rendered: dict[str, dict]) -> dict[str, str]:
    """The environment the container gets: the ConfigMap's data, then its own `env` entries."""
    merged = dict(rendered["ConfigMap"]["data"])
    merged.update({entry["name"]: entry["value"] for entry in container(rendered).get("env", [])})
    return merged
