"""Every NIXERY_ variable a shipped way of deploying sets is one Nixery knows.

An unknown NIXERY_ variable stops start-up (nixery/preflight.py: most likely a typo that would
leave a default in place), so one misspelt name in the Dockerfile, the flake's image, a
Kubernetes base, component or documented overlay, a script or an example in the docs leaves
whoever follows it with a server that refuses to start. Two checks:

- every NIXERY_ name any shipped file mentions (module.nix, flake.nix, default.nix, the
  Dockerfile, scripts/, deploy/, docs/, README.md, ...: everything but the test suite) is in
  VARIABLE_NAMES, except the docs' own examples of a typo and of another program's variable,
  which must be refused and accepted exactly as the docs show;
- the environment each container deployment gives Nixery (the Dockerfile's ENV, the flake
  image's Env, `kubectl kustomize` of the base, the filesystem overlay, each component and each
  overlay the docs show) passes the start-up check without an error or a warning.

(module.nix's environment, option by option, is tests/test_nix_packaging.py's.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kustomize import BASE, ROOT, render_documents, service_links, settings
from nixery.config import VARIABLE_NAMES, load
from nixery.preflight import misspelt_variables
from test_kubernetes import FILESYSTEM, OPERATIONS, documented_overlays, overlays_in

NAME = re.compile(r"\bNIXERY_[A-Z0-9_]*[A-Z0-9]\b")
# What is shipped: everything but the test suite (whose own typos are on purpose), except the
# NixOS VM test the flake's checks run.
SKIPPED = {".git", ".venv", ".benchmarks", "tests", "__pycache__", "result"}
SHIPPED_TESTS = ROOT / "tests" / "nixos"
# The docs' examples of names that are not Nixery's: a typo, and a wrapper's own variables.
TYPO, MEANT = "NIXERY_PKG_PATH", "NIXERY_PKGS_PATH"
FOREIGN = ("NIXERY_RELEASE", "NIXERY_REGION")
# docs/operations.md's troubleshooting table writes a message with placeholders.
PLACEHOLDER = "NIXERY_X"
FIRST_HOUR = ROOT / "docs" / "first-hour.md"
COMPONENTS = ("htpasswd", "token-auth", "grace-period")


def shipped_files() -> list[Path]:
    found = []
    for path in [*ROOT.rglob("*"), *SHIPPED_TESTS.rglob("*")]:
        parts = path.relative_to(ROOT).parts
        inside_tests = path.is_relative_to(SHIPPED_TESTS)
        if (path.is_file() and not (set(parts) & SKIPPED and not inside_tests)
                and not any(part.endswith(".egg-info") or part.startswith("result-") for part in parts)):
            found.append(path)
    return sorted(set(found))


def mentioned(path: Path) -> set[str]:
    try:
        return set(NAME.findall(path.read_text()))
    except UnicodeDecodeError:  # an image, say
        return set()


def test_every_nixery_name_in_the_shipped_files_is_nixerys():
    files = shipped_files()
    names = {path.relative_to(ROOT).as_posix(): mentioned(path) for path in files}
    # The scan reads what the deployments are made of.
    assert {"module.nix", "flake.nix", "Dockerfile", "scripts/serve", "README.md", "docs/kubernetes.md",
            "docs/kubernetes-operations.md", "deploy/kubernetes/kustomization.yaml",
            "deploy/kubernetes/token-auth/kustomization.yaml", "deploy/overlays/filesystem/kustomization.yaml",
            "tests/nixos/hardening.nix", "nixery/config.py"} <= set(names)
    assert {"NIXERY_STORAGE_LIMIT", "NIXERY_GC_INTERVAL", "NIXERY_NIX_STORE_LIMIT"} <= names["deploy/kubernetes/kustomization.yaml"]
    examples = {TYPO, *FOREIGN, PLACEHOLDER}
    unknown = {file: sorted(found - VARIABLE_NAMES - (examples if file.startswith("docs/") else set()))
               for file, found in names.items()}
    assert not {file: found for file, found in unknown.items() if found}, \
        "names Nixery does not know (an instance given them refuses to start)"


def test_the_docs_examples_of_foreign_names_are_treated_as_shown():
    """docs/first-hour.md's typo is refused with the line it quotes, and its wrapper's variables
    pass once listed in NIXERY_IGNORE_VARIABLES as it shows."""
    text = FIRST_HOUR.read_text()
    (refused,) = misspelt_variables({TYPO: "/srv/pkgs"})
    assert refused.fatal and f"did you mean {MEANT}?" in refused.message
    assert f"nixery: {refused.message}" in text
    (listed,) = re.findall(r"`NIXERY_IGNORE_VARIABLES=([A-Z0-9_,]+)`", text)
    assert set(listed.split(",")) == set(FOREIGN)
    env = {name: "x" for name in FOREIGN}
    assert all(finding.fatal for finding in misspelt_variables(env))
    assert list(misspelt_variables(env, load({"NIXERY_IGNORE_VARIABLES": listed}).ignored_variables)) == []


def dockerfile_environment() -> dict[str, str]:
    """The Dockerfile's ENV (one instruction, `NAME=value` pairs over continued lines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (env,) = re.findall(r"^ENV (.*)$", text, flags=re.M)
    return dict(pair.split("=", 1) for pair in env.split())


def flake_image_environment() -> dict[str, str]:
    """packages.image's `config.Env` in flake.nix, read as text (its evaluation is
    tests/test_nix_packaging.py's)."""
    (block,) = re.findall(r"\bEnv = \[(.*?)\];", (ROOT / "flake.nix").read_text(), flags=re.S)
    return dict(entry.split("=", 1) for entry in re.findall(r'"([^"]+)"', block))


def overlay(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "overlay"
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(text.replace("../nixery/", os.path.relpath(ROOT, directory) + "/"))
    return directory


def component_overlay(tmp_path: Path, component: str) -> Path:
    directory = tmp_path / "overlay"
    return overlay(tmp_path, "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                             f"resources:\n  - {os.path.relpath(BASE, directory)}\n"
                             f"components:\n  - {os.path.relpath(BASE / component, directory)}\n")


DEPLOYMENTS = ["dockerfile", "flake-image", "kubernetes-base", "kubernetes-filesystem",
               *(f"component-{name}" for name in COMPONENTS),
               *(f"docs-{i}" for i in range(len(documented_overlays()))),
               *(f"operations-{i}" for i in range(len(overlays_in(OPERATIONS))))]


def kubernetes_environment(directory: Path) -> dict[str, str]:
    """What the pod's container gets: its settings, and the Services' links where the pod keeps them."""
    documents = render_documents(directory)
    objects = {doc["kind"]: doc for doc in documents}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    links = service_links(documents) if pod.get("enableServiceLinks", True) else {}
    return {**links, **settings(objects)}


def environment(which: str, tmp_path: Path) -> dict[str, str]:
    if which == "dockerfile":
        return dockerfile_environment()
    if which == "flake-image":
        return flake_image_environment()
    if which == "kubernetes-base":
        return kubernetes_environment(BASE)
    if which == "kubernetes-filesystem":
        return kubernetes_environment(FILESYSTEM)
    kind, name = which.split("-", 1)
    if kind == "component":
        return kubernetes_environment(component_overlay(tmp_path, name))
    documents = documented_overlays() if kind == "docs" else overlays_in(OPERATIONS)
    return kubernetes_environment(overlay(tmp_path, documents[int(name)]))


@pytest.mark.parametrize("which", DEPLOYMENTS)
def test_each_deployments_environment_passes_the_start_up_check(which, tmp_path):
    env = environment(which, tmp_path)
    assert env
    ignored = load({"NIXERY_IGNORE_VARIABLES": env.get("NIXERY_IGNORE_VARIABLES", "")}).ignored_variables
    findings = [finding.message for finding in misspelt_variables(env, ignored)]
    assert findings == [], f"{which} gives Nixery {sorted(env)}"


def test_the_service_links_of_a_deployment_that_keeps_them_are_no_typos():
    """A Deployment of one's own (a chart, say) may keep the kubelet's service links: the variables
    of the Service `nixery` and of a token service `nixery-auth` beside it are links to start-up,
    not unknown settings; a typo among them is still refused, and outside a pod they are unknown."""
    documents = render_documents(BASE)
    token_service = {"kind": "Service", "metadata": {"name": "nixery-auth"},
                     "spec": {"ports": [{"name": "https", "port": 5001, "protocol": "TCP"}]}}
    links = service_links([*documents, token_service])
    assert {"NIXERY_SERVICE_HOST", "NIXERY_PORT_80_TCP_ADDR", "NIXERY_AUTH_SERVICE_PORT_HTTPS"} <= set(links)
    env = {**links, **settings({doc["kind"]: doc for doc in documents})}
    assert [finding.message for finding in misspelt_variables(env)] == []
    (typo,) = misspelt_variables({**env, "NIXERY_STORAGE_LIMT": "1G"})
    assert typo.fatal and "did you mean NIXERY_STORAGE_LIMIT?" in typo.message
    outside = {name: value for name, value in env.items() if name != "KUBERNETES_SERVICE_HOST"}
    assert all(finding.fatal for finding in misspelt_variables(outside))
    assert {finding.message.split()[0] for finding in misspelt_variables(outside)} == \
        {name for name in links if name.startswith("NIXERY_")}
