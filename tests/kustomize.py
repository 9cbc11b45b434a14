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


# The Service addresses the environment below gives (any address: only the names matter).
CLUSTER_IP = "10.96.0.10"


def service_links(documents: list[dict]) -> dict[str, str]:
    """The variables the kubelet gives every pod of the namespace for these Services, unless the
    pod says `enableServiceLinks: false` (kubernetes.io/docs/concepts/services-networking/service,
    "Environment variables"), with the API server's own `kubernetes` Service, which every pod gets."""
    api = {"kind": "Service", "metadata": {"name": "kubernetes"},
           "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}}
    env: dict[str, str] = {}
    for service in [api, *(doc for doc in documents if doc["kind"] == "Service")]:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = CLUSTER_IP
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{CLUSTER_IP}:{ports[0]['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            link = f"{prefix}_PORT_{port['port']}_{protocol}"
            env[link] = f"{protocol.lower()}://{CLUSTER_IP}:{port['port']}"
            env.update({f"{link}_PROTO": protocol.lower(), f"{link}_PORT": str(port["port"]), f"{link}_ADDR": CLUSTER_IP})
    return env
