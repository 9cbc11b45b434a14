"""deploy/kubernetes, rendered by `kubectl kustomize` as a user would, checked for what a
cluster needs to run Nixery: the image, probes on the health endpoints, a Service in front of
the container port, a PodDisruptionBudget that covers the pods, the Workload Identity and
signing wiring docs/kubernetes.md describes, grace periods that let builds finish, the "restricted"
Pod Security Standard, and the Kubernetes API's schemas (base and docs/kubernetes.md's overlays).
tests/test_container_image.py runs the Dockerfile's image as the rendered Deployment does."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from kustomize import BASE, ROOT, container, render, render_documents, settings
from nixery import config as nixery_config


FILESYSTEM = ROOT / "deploy" / "overlays" / "filesystem"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return render(BASE)


def test_the_base_renders_every_object(rendered):
    assert set(rendered) == {"Deployment", "Service", "Ingress", "PodDisruptionBudget", "ServiceAccount", "ConfigMap"}


def test_deployment_runs_nixerys_image_with_probes_on_the_health_endpoints(rendered):
    nixery = container(rendered)
    # `docker build -t nixery .` (and the flake's packages.image: name "nixery", tag "latest").
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
    proxies = nixery_config.load({"NIXERY_TRUSTED_PROXIES": env["NIXERY_TRUSTED_PROXIES"]}).server.trusted_proxies
    assert proxies and all(network.is_private for network in proxies)
    # Storage has a budget, collected on a schedule (one replica at a time, by the bucket's lease).
    budget = nixery_config.load({name: env[name] for name in ("NIXERY_STORAGE_LIMIT", "NIXERY_GC_INTERVAL")}).gc
    assert budget.storage_limit > 0 and budget.interval > 0
    # Workload Identity: the pods' service account is bound to a Google account, which signs blob
    # URLs through IAM (tests/test_gcs.py): no key file, no Secret to create first.
    spec = rendered["Deployment"]["spec"]["template"]["spec"]
    # Without the kubelet's variables for the Service `nixery` (tests/test_shipped_variables.py).
    assert spec["enableServiceLinks"] is False
    account = rendered["ServiceAccount"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    assert not {"GCS_SIGNING_KEY", "GCS_SIGNING_ACCOUNT"} & set(env)
    assert not [volume for volume in spec["volumes"] if "secret" in volume]


def test_an_overlay_sets_image_and_bucket(tmp_path, rendered):
    """What docs/kubernetes.md tells users to write: an overlay over the base."""
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
    assert termination == loaded.server.grace_period
    # Endpoints controllers and kube-proxy take a few seconds to stop sending new pulls here.
    assert pre_stop >= 5
    assert termination >= pre_stop + loaded.limits.eval_timeout + loaded.nix_timeout + UPLOAD_MARGIN, \
        (termination, pre_stop, loaded.limits.eval_timeout, loaded.nix_timeout)


def test_an_overlay_changes_the_grace_period_in_one_place(tmp_path):
    """What docs/kubernetes.md tells users to write to give builds longer: the new NIXERY_GRACE_PERIOD
    (and NIX_TIMEOUT) in the ConfigMap, and the component that copies it into the pods."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(BASE, overlay)}\n"
        f"components:\n  - {os.path.relpath(BASE / 'grace-period', overlay)}\n"
        "configMapGenerator:\n  - name: nixery-config\n    behavior: merge\n    literals:\n"
        "      - NIX_TIMEOUT=900\n      - NIXERY_GRACE_PERIOD=1080\n")
    objects = render(overlay)
    loaded, pre_stop, termination = _grace(objects)
    assert loaded.nix_timeout == 900 and termination == loaded.server.grace_period == 1080
    assert termination >= pre_stop + loaded.limits.eval_timeout + loaded.nix_timeout + UPLOAD_MARGIN
    assert _ingress_timeouts(objects) == (1080, 1080), "the Ingress waits for builds as long"


# The oldest Kubernetes release still supported upstream when this was written, and the newest
# schemas kubernetes-validate ships: the base must be valid for both.
SCHEMA_VERSIONS = ("1.32.0", "latest")
OVERLAY_MARK = "# kustomization.yaml of your overlay"


def overlays_in(document: Path) -> list[str]:
    """The overlays a Markdown document shows (YAML blocks, indented in a list item or not,
    starting with the mark)."""
    text = document.read_text()
    blocks = [textwrap.dedent(body) for body in re.findall(r"^ *```yaml\n(.*?)^ *```", text, flags=re.S | re.M)]
    return [block for block in blocks if block.startswith(OVERLAY_MARK)]


def documented_overlays() -> list[str]:
    """The overlays docs/kubernetes.md shows."""
    return overlays_in(ROOT / "docs" / "kubernetes.md")


OPERATIONS = ROOT / "docs" / "kubernetes-operations.md"


def _schema_errors(documents: list[dict]) -> list[str]:
    import kubernetes_validate

    errors = []
    for version in SCHEMA_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for document in documents:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{version} {document['kind']}: {e.message} at {'/'.join(map(str, e.path))}")
    return errors


def test_the_docs_show_overlays():
    assert len(documented_overlays()) >= 3


def test_the_operations_guide_shows_overlays():
    assert len(overlays_in(OPERATIONS)) >= 4


@pytest.mark.parametrize("which", ["base", "filesystem", *(f"docs-{i}" for i in range(len(documented_overlays()))),
                                   *(f"operations-{i}" for i in range(len(overlays_in(OPERATIONS))))])
def test_rendered_objects_validate_against_the_kubernetes_schemas(which, tmp_path):
    """Offline, with kubernetes-validate's copies of the API's OpenAPI schemas, strict (no
    field the API does not know): the base, and each overlay of docs/kubernetes.md and of
    docs/kubernetes-operations.md where it says `../nixery/` for a checkout of this repository,
    and the filesystem overlay."""
    if which in ("base", "filesystem"):
        directory = BASE if which == "base" else FILESYSTEM
    else:
        directory = tmp_path / "overlay"
        directory.mkdir()
        kind, number = which.split("-")
        text = (documented_overlays() if kind == "docs" else overlays_in(OPERATIONS))[int(number)]
        (directory / "kustomization.yaml").write_text(
            text.replace("../nixery/", os.path.relpath(ROOT, directory) + "/"))
    documents = render_documents(directory)
    assert documents
    assert _schema_errors(documents) == []


def test_a_wrong_field_fails_validation(rendered):
    """The check itself: a string where the API wants seconds, and a field it does not have."""
    import copy

    as_string, unknown = copy.deepcopy(rendered["Deployment"]), copy.deepcopy(rendered["Deployment"])
    as_string["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "480"
    unknown["spec"]["template"]["spec"]["containers"][0]["healthz"] = {}
    assert _schema_errors([rendered["Deployment"]]) == []
    errors = _schema_errors([as_string])
    assert len(errors) == len(SCHEMA_VERSIONS) and all("terminationGracePeriodSeconds" in e for e in errors), errors
    errors = _schema_errors([unknown])
    assert len(errors) == len(SCHEMA_VERSIONS) and all("healthz" in e for e in errors), errors


# The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards):
# the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def test_pods_pass_the_restricted_pod_security_standard(rendered):
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    pod_security = pod.get("securityContext", {})
    for one in pod["containers"] + pod.get("initContainers", []):
        security = {**pod_security, **one.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 1) != 0
        assert security.get("allowPrivilegeEscalation") is False
        assert security.get("privileged", False) is False
        assert "ALL" in security.get("capabilities", {}).get("drop", [])
        assert set(security.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        assert security.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        assert not one.get("ports") or all("hostPort" not in port for port in one["ports"])


def test_the_filesystem_overlay_runs_one_replica_on_a_volume_claim():
    """Without a bucket: one replica (filesystem storage is not shared), its blobs and state on a
    PersistentVolumeClaim, no GCS settings left, and a budget that does not block node drains."""
    objects = render(FILESYSTEM)
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    env = settings(objects)
    assert not {name for name in env if name.startswith(("GCS_", "BUCKET"))}, env
    loaded = nixery_config.load(env)
    assert loaded.storage_backend == "filesystem"
    # The image's STORAGE_PATH and NIXERY_STATE_DIR (Dockerfile) lie on the claim's mount.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "STORAGE_PATH=/var/lib/nixery/storage" in dockerfile and "NIXERY_STATE_DIR=/var/lib/nixery/state" in dockerfile
    (mount,) = container(objects)["volumeMounts"]
    (volume,) = spec["template"]["spec"]["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/var/lib/nixery"}
    claim = objects["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert objects["PodDisruptionBudget"]["spec"].get("maxUnavailable") == 1
    # Collections keep the blobs under the limit, below the claim's size (which holds the state too).
    claimed = nixery_config.load({"NIXERY_STORAGE_LIMIT": claim["spec"]["resources"]["requests"]["storage"].rstrip("i")})
    assert 0 < loaded.gc.storage_limit < claimed.gc.storage_limit and loaded.gc.interval > 0
    assert "minAvailable" not in objects["PodDisruptionBudget"]["spec"]


def test_replicas_prefer_different_nodes(rendered):
    pod = rendered["Deployment"]["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def secret_mount(objects: dict[str, dict], secret: str) -> str:
    """Where the container mounts the Secret `secret`: read-only, readable by the pod's group only."""
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret]
    assert mounts[name]["readOnly"] and volumes[name]["secret"]["defaultMode"] == 0o440
    return mounts[name]["mountPath"]


@pytest.mark.parametrize("under", [BASE, FILESYSTEM], ids=["base", "filesystem"])
def test_the_htpasswd_component_gives_logins(under, tmp_path):
    """An overlay listing deploy/kubernetes/htpasswd: Nixery reads the mounted Secret's file (here a
    real htpasswd file where the Secret would be mounted) and asks for logins."""
    import bcrypt

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(under, overlay)}\n"
        f"components:\n  - {os.path.relpath(BASE / 'htpasswd', overlay)}\n")
    objects = render(overlay)
    env = settings(objects)
    relative = Path(env["NIXERY_HTPASSWD"]).relative_to(secret_mount(objects, "nixery-htpasswd"))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / relative).write_text("alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode() + "\n")
    env = {k: v for k, v in env.items() if not k.startswith(("GCS_", "BUCKET"))}
    loaded = nixery_config.load({**env, "NIXERY_HTPASSWD": str(secret / relative)})
    assert loaded.auth.level.value == "all" and [user for user, _ in loaded.auth.htpasswd] == ["alice"]
    assert _schema_errors(render_documents(overlay)) == []


def _ingress_timeouts(objects: dict[str, dict]) -> tuple[int, int]:
    annotations = objects["Ingress"]["metadata"]["annotations"]
    return (int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]),
            int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]))


def test_the_ingress_terminates_tls_and_waits_for_builds(rendered):
    """Docker needs TLS; ingress-nginx's timeouts (60 s by default) must outlast an evaluation, a
    build and the upload, as the grace period does: they are that one number, here and in an
    overlay that changes it."""
    ingress = rendered["Ingress"]["spec"]
    (rule,) = ingress["rules"]
    (tls,) = ingress["tls"]
    assert tls["hosts"] == [rule["host"]] and tls["secretName"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    service = rendered["Service"]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert [port["name"] for port in service["spec"]["ports"]] == ["http"]
    assert rendered["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for objects in (rendered, render(FILESYSTEM)):
        loaded, _, termination = _grace(objects)
        for timeout in _ingress_timeouts(objects):
            assert timeout == loaded.server.grace_period == termination
            assert timeout >= loaded.limits.eval_timeout + loaded.nix_timeout + UPLOAD_MARGIN
    # (An overlay that changes the grace period changes these too: the test above.)


@pytest.mark.parametrize("under", [BASE, FILESYSTEM], ids=["base", "filesystem"])
def test_the_token_auth_component_gives_token_logins(under, tmp_path):
    """An overlay listing deploy/kubernetes/token-auth and naming its token service in the
    ConfigMap: Nixery reads the public keys from the mounted Secret (here a real key where the
    Secret would be mounted) and asks every pull for a token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(under, overlay)}\n"
        f"components:\n  - {os.path.relpath(BASE / 'token-auth', overlay)}\n"
        "configMapGenerator:\n  - name: nixery-config\n    behavior: merge\n    literals:\n"
        "      - NIXERY_TOKEN_REALM=https://auth.example.org/token\n      - NIXERY_TOKEN_SERVICE=nixery.example.org\n"
        "      - NIXERY_TOKEN_ISSUER=auth.example.org\n")
    objects = render(overlay)
    env = settings(objects)
    relative = Path(env["NIXERY_TOKEN_PUBLIC_KEY"]).relative_to(secret_mount(objects, "nixery-token"))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / relative).write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {k: v for k, v in env.items() if not k.startswith(("GCS_", "BUCKET"))}
    loaded = nixery_config.load({**env, "NIXERY_TOKEN_PUBLIC_KEY": str(secret / relative)})
    assert loaded.auth.level.value == "all" and len(loaded.auth.token.public_keys) == 1
    assert loaded.auth.token.realm == "https://auth.example.org/token"
    assert _schema_errors(render_documents(overlay)) == []
