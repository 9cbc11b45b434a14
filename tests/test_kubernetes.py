"""deploy/kubernetes, rendered by `kubectl kustomize` as a user would, checked for what a
cluster needs to run Nixery: the flake's image, probes on the health endpoints, a Service
in front of the container port, a PodDisruptionBudget that covers the pods, and the
Workload Identity and signing wiring the README describes."""

from __future__ import annotations

import os

import pytest

from kustomize import BASE, ROOT, container, render, settings
from nixery import config as nixery_config


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return render(BASE)


def test_the_base_renders_every_object(rendered):
    assert set(rendered) == {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "ConfigMap"}


def test_deployment_runs_the_flakes_image_with_probes_on_the_health_endpoints(rendered):
    nixery = container(rendered)
    # The flake's image is `nixery:latest` (packages.image: name "nixery", tag "latest").
    assert nixery["image"] == "nixery:latest"
    assert nixery["ports"] == [{"name": "http", "containerPort": 8080}]
    assert nixery["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert nixery["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert nixery["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # /readyz may wait out GCS' 10 s of retries before it answers 503.
    assert nixery["readinessProbe"]["timeoutSeconds"] > 10
    resources = nixery["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    assert resources["requests"]["ephemeral-storage"], "the Nix store lives in the container's writable layer"
    spec = rendered["Deployment"]["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_probe_paths_are_the_apps_routes(rendered):
    from falcon import testing
    from nixery.app import create_app

    config = nixery_config.load({"NIXERY_PKGS_PATH": str(ROOT), "STORAGE_PATH": "/tmp/nixery-k8s-test/storage",
                                 "NIXERY_STATE_DIR": "/tmp/nixery-k8s-test/state"})
    client = testing.TestClient(create_app(config))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container(rendered)[probe]["httpGet"]["path"]
        assert client.simulate_get(path).status_code == 200, path


def test_service_reaches_the_container_port(rendered):
    service = rendered["Service"]["spec"]
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    pod_labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()


def test_disruption_budget_covers_the_pods(rendered):
    budget = rendered["PodDisruptionBudget"]
    assert budget["apiVersion"] == "policy/v1" and budget["spec"]["minAvailable"] == 1
    pod_labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] < rendered["Deployment"]["spec"]["replicas"]


def test_settings_are_nixerys_and_storage_is_shared(rendered):
    nixery = container(rendered)
    assert [ref["configMapRef"]["name"] for ref in nixery["envFrom"]] == [rendered["ConfigMap"]["metadata"]["name"]]
    env = settings(rendered)
    assert set(env) <= nixery_config.VARIABLE_NAMES, set(env) - nixery_config.VARIABLE_NAMES
    # Replicas share what they build only through a bucket.
    assert env["GCS_BUCKET"]
    # Behind the Ingress, clients are told apart by X-Forwarded-For.
    proxies = nixery_config.load({"NIXERY_TRUSTED_PROXIES": env["NIXERY_TRUSTED_PROXIES"]}).trusted_proxies
    assert proxies and all(network.is_private for network in proxies)
    # Workload Identity: the pods' service account is bound to the Google account that signs.
    spec = rendered["Deployment"]["spec"]["template"]["spec"]
    account = rendered["ServiceAccount"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == env["GCS_SIGNING_ACCOUNT"]
    mounts = {m["name"]: m["mountPath"] for m in nixery["volumeMounts"]}
    assert env["GCS_SIGNING_KEY"].startswith(mounts["gcs-signing"] + "/")


def test_an_overlay_sets_image_and_bucket(tmp_path, rendered):
    """What the README tells users to write: an overlay over the base."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(BASE, overlay)}\n"
        "images:\n  - name: nixery\n    newName: registry.example.org/nixery\n    newTag: \"0.1.0\"\n"
        "configMapGenerator:\n  - name: nixery-config\n    behavior: merge\n    literals:\n"
        "      - GCS_BUCKET=acme-nixery\n")
    objects = render(overlay)
    assert container(objects)["image"] == "registry.example.org/nixery:0.1.0"
    assert objects["ConfigMap"]["data"]["GCS_BUCKET"] == "acme-nixery"


# Seconds a finished build may take to archive and store its layers (bench/layers.py: a 423 MB
# image in well under this) before its client has its manifest.
UPLOAD_MARGIN = 30


def _pre_stop_seconds(nixery: dict) -> int:
    command = nixery["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def _grace(objects: dict[str, dict]) -> tuple[nixery_config.Config, int, int]:
    """Nixery's configuration as the pods get it, the preStop delay and terminationGracePeriodSeconds."""
    env = settings(objects)
    loaded = nixery_config.load({name: env[name] for name in ("NIX_TIMEOUT", "NIXERY_EVAL_TIMEOUT", "NIXERY_GRACE_PERIOD")
                                 if name in env})
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    return loaded, _pre_stop_seconds(container(objects)), pod["terminationGracePeriodSeconds"]


def test_a_rollout_lets_the_builds_in_flight_finish(rendered):
    """The kubelet kills a pod terminationGracePeriodSeconds after it began stopping it (preStop
    included); by then an evaluation and a build that began just before must be done and stored."""
    loaded, pre_stop, termination = _grace(rendered)
    # One number: the pod's grace is Nixery's.
    assert termination == loaded.grace_period
    # Endpoints controllers and kube-proxy take a few seconds to stop sending new pulls here.
    assert pre_stop >= 5
    assert termination >= pre_stop + loaded.eval_timeout + loaded.nix_timeout + UPLOAD_MARGIN, \
        (termination, pre_stop, loaded.eval_timeout, loaded.nix_timeout)


def test_an_overlay_changes_the_grace_period_in_one_place(tmp_path):
    """What the README tells users to write to give builds longer: the new NIXERY_GRACE_PERIOD
    (and NIX_TIMEOUT) in the ConfigMap, and the component that copies it into the pods."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(BASE, overlay)}\n"
        f"components:\n  - {os.path.relpath(BASE / 'grace-period', overlay)}\n"
        "configMapGenerator:\n  - name: nixery-config\n    behavior: merge\n    literals:\n"
        "      - NIX_TIMEOUT=900\n      - NIXERY_GRACE_PERIOD=1080\n")
    loaded, pre_stop, termination = _grace(render(overlay))
    assert loaded.nix_timeout == 900 and termination == loaded.grace_period == 1080
    assert termination >= pre_stop + loaded.eval_timeout + loaded.nix_timeout + UPLOAD_MARGIN
