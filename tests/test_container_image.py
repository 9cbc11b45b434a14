"""The Dockerfile's image, run the way the rendered Deployment (deploy/kubernetes) runs it.

Nothing can be pulled from Docker Hub here, so `debian:bookworm-slim` is made locally: the stock
minbase bookworm of tests/containers.py, tagged with that name. The Dockerfile is then built
unchanged. Each container gets what the rendered Deployment gives its pod: the ConfigMap's and the
container's environment, the pod's user and group, its dropped capabilities and no privilege
escalation, its memory limit, and its probes (asked from outside, within their timeouts). What a
test machine cannot give is swapped, and only that: the filesystem backend instead of the bucket
(no GCS, no signing key), and a generated package set mounted at /pkgs instead of the channel.
From outside, Docker pulls the image by the published port and runs it.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Sequence

import pytest

from containers import ROOT, ensure_dockerd, file_lock, stock_image
from kustomize import container, render, settings
from pkgset import make_package_set

IMAGE = "nixery-test-image:latest"
BASE_IMAGE = "debian:bookworm-slim"
PORT = 8080
# What a test cannot have: a bucket (and its signing key), the channel's nixpkgs.
NOT_HERE = ("GCS_BUCKET", "BUCKET", "GCS_SIGNING_KEY", "GCS_SIGNING_ACCOUNT", "NIXERY_CHANNEL")


@pytest.fixture(scope="module")
def image() -> str:
    """The Dockerfile built unchanged on a locally made debian:bookworm-slim. Docker's build cache
    keys each step by its inputs, so an unchanged checkout is not rebuilt."""
    ensure_dockerd()
    subprocess.run(["docker", "tag", stock_image("bookworm"), BASE_IMAGE], check=True, capture_output=True)
    with file_lock("nixery-image.lock"):
        built = subprocess.run(["docker", "build", "-q", "-t", IMAGE, str(ROOT)], capture_output=True, text=True,
                               timeout=1800)
    assert built.returncode == 0, built.stderr[-6000:]
    return IMAGE


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return render()


def _memory(quantity: str) -> str:
    """A Kubernetes memory quantity (4Gi, 512Mi) as `docker run --memory` takes it."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t"}
    for suffix, docker in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + docker
    return quantity


def pod_options(rendered: dict[str, dict], pkgs: Path, drop: Sequence[str] = ()) -> list[str]:
    """`docker run` options that give the container what the rendered Deployment gives the pod,
    but for NOT_HERE (and `drop`): environment, user, capabilities, memory limit, port, package set."""
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    nixery = container(rendered)
    env = {k: v for k, v in settings(rendered).items() if k not in NOT_HERE and k not in drop}
    env["NIXERY_PKGS_PATH"] = "/pkgs"
    security = {**pod["securityContext"], **nixery["securityContext"]}
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    options = ["--user", f"{security['runAsUser']}:{security['runAsGroup']}", "--group-add", str(security["fsGroup"]),
               *(f"--cap-drop={cap}" for cap in security["capabilities"]["drop"])]
    if security["allowPrivilegeEscalation"] is False:
        options += ["--security-opt", "no-new-privileges"]
    limits = nixery["resources"]["limits"]
    if "memory" in limits:
        options += ["--memory", _memory(limits["memory"])]
    (port,) = nixery["ports"]
    assert port["containerPort"] == PORT
    options += ["-p", f"127.0.0.1::{PORT}", "-v", f"{pkgs}:/pkgs:ro"]
    for key, value in env.items():
        options += ["-e", f"{key}={value}"]
    return options


class Running:
    """A detached container of the image; removed (with its volumes) when the `with` block ends."""

    def __init__(self, image: str, options: Sequence[str]):
        self.name = f"nixery-image-test-{uuid.uuid4().hex[:12]}"
        started = subprocess.run(["docker", "run", "-d", "--name", self.name, *options, image],
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        out = subprocess.run(["docker", "port", self.name, f"{PORT}/tcp"], capture_output=True, text=True,
                             check=True).stdout
        self.port = int(next(line for line in out.splitlines() if line.startswith("127.0.0.1:")).rsplit(":", 1)[1])
        self.host = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["docker", "rm", "-f", "-v", self.name], capture_output=True, timeout=120)

    def logs(self) -> str:
        return subprocess.run(["docker", "logs", self.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=60).stdout

    def state(self) -> dict:
        out = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", self.name], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    def get(self, path: str, timeout: float) -> int:
        with urllib.request.urlopen(f"http://{self.host}{path}", timeout=timeout) as answer:
            return answer.status

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.state()["Running"], f"the container exited:\n{self.logs()[-6000:]}"
            try:
                if self.get("/v2/", timeout=2) == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise AssertionError(f"no registry answered within {timeout}s:\n{self.logs()[-6000:]}")

    def summary(self) -> dict:
        """The configuration the server reported when it started (its "starting nixery" log line)."""
        for line in self.logs().splitlines():
            if line.startswith("{") and json.loads(line).get("message") == "starting nixery":
                return json.loads(line)["config"]
        raise AssertionError(f"no start-up summary in the log:\n{self.logs()[-6000:]}")


def docker_pull_and_run(host: str, name: str, command: Sequence[str]) -> str:
    """`docker pull host/name` as any Docker client does (127.0.0.1 may be plain HTTP), then the
    output of `docker run` of the pulled image with `command`; the pulled image is removed after."""
    reference = f"{host}/{name}"
    try:
        pulled = subprocess.run(["docker", "pull", "-q", reference], capture_output=True, text=True, timeout=600)
        assert pulled.returncode == 0, pulled.stderr
        ran = subprocess.run(["docker", "run", "--rm", reference, *command], capture_output=True, text=True,
                             timeout=120)
        assert ran.returncode == 0, ran.stderr
        return ran.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", reference], capture_output=True, timeout=120)


def test_the_image_serves_a_docker_pull_as_the_deployment_runs_it(image, rendered, tmp_path):
    pkgs = make_package_set(tmp_path / "pkgs", salt=uuid.uuid4().hex)
    # The image's HEALTHCHECK, asked every 2 s rather than every 20 s.
    with Running(image, [*pod_options(rendered, pkgs), "--health-interval", "2s", "--health-start-period", "0s"]) as box:
        box.wait_ready()
        nixery = container(rendered)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = nixery[probe]["httpGet"]
            assert get["port"] == "http"
            assert box.get(get["path"], timeout=nixery[probe].get("timeoutSeconds", 1)) == 200, probe
        # Nix and Nixery run as the pod's user, who owns the single-user store.
        uid = str(rendered["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
        owners = subprocess.run(["docker", "exec", box.name, "sh", "-c", "id -u; stat -c %u /nix/store"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert owners == [uid, uid]

        assert docker_pull_and_run(box.host, "shell/hello", ["hello"]).strip() == "Hello, world!"

        deadline = time.monotonic() + 30
        while box.state()["Health"]["Status"] != "healthy":
            assert time.monotonic() < deadline, box.state()["Health"]
            time.sleep(1)


def test_docker_stop_with_the_rendered_grace_lets_a_running_build_finish(image, rendered, tmp_path):
    """A rollout as Docker has it: `docker stop -t terminationGracePeriodSeconds` (SIGTERM, the
    image's STOPSIGNAL, then SIGKILL when the time is up) while a 30 s build runs for a `docker
    pull`. The build finishes and its image is stored, the pull that waited for it completes (its
    manifest by digest and blob requests come after the stop, to the same lone container), and
    the server exits by itself once no request has come for the keep-alive time."""
    build_seconds = 30
    pkgs = make_package_set(tmp_path / "pkgs", salt=uuid.uuid4().hex, slow_seconds=build_seconds)
    grace = rendered["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    with Running(image, pod_options(rendered, pkgs)) as box:
        box.wait_ready()
        reference = f"{box.host}/slowbuild"
        pull = subprocess.Popen(["docker", "pull", "-q", reference], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not json.load(urllib.request.urlopen(f"http://{box.host}/builds.json", timeout=5))["in_progress"]:
                assert time.monotonic() < deadline and pull.poll() is None, box.logs()[-6000:]
                time.sleep(0.5)
            started = time.monotonic()
            stop = subprocess.run(["docker", "stop", "-t", str(grace), box.name], capture_output=True, text=True,
                                  timeout=grace + 60)
            stopped = time.monotonic() - started
            assert stop.returncode == 0, stop.stderr
            output = pull.communicate(timeout=60)[0]
            logs = box.logs()
            # The server waited for the build, stored the image and exited by itself, well
            # before the grace ran out.
            built = [json.loads(line) for line in logs.splitlines() if '"image built"' in line]
            assert [(entry["image"], entry["outcome"]) for entry in built] == [("slowbuild", "built")], logs[-6000:]
            assert build_seconds / 2 < stopped < grace, stopped
            assert box.state()["ExitCode"] == 0, logs[-6000:]
            assert pull.returncode == 0, f"{output}\n{logs[-6000:]}"
            ran = subprocess.run(["docker", "run", "--rm", reference, "slow-done"], capture_output=True, text=True,
                                 timeout=120)
            assert ran.stdout.strip() == "slow-done", ran.stderr
            print(f"docker stop during a {build_seconds}s build took {stopped:.1f}s (grace {grace}s)")
        finally:
            pull.kill()
            subprocess.run(["docker", "rmi", "-f", reference], capture_output=True, timeout=120)


def test_a_cpu_limit_of_one_runs_one_build_at_a_time(image, rendered, tmp_path):
    """`docker run --cpus 1` (what a Kubernetes CPU limit of 1 becomes: cpu.max "100000 100000")
    without NIXERY_MAX_BUILDS: one build slot, whatever the machine's cores; and two slow builds
    asked for at once run one after the other."""
    assert "NIXERY_MAX_BUILDS" not in settings(rendered)
    build_seconds = 6
    pkgs = make_package_set(tmp_path / "pkgs", salt=uuid.uuid4().hex, slow_seconds=build_seconds)
    with Running(image, [*pod_options(rendered, pkgs), "--cpus", "1"]) as box:
        box.wait_ready()
        assert box.summary()["max_builds"] == 1
        # Two images, the second asked for while the first builds: with one slot, the second's
        # build starts only once the first's image is built (with two, both would start at once).
        names = ["slowbuild", "slowbuild/greeter"]
        pulls = []
        try:
            for name in names:
                pulls.append(subprocess.Popen(["docker", "pull", "-q", f"{box.host}/{name}"], stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
                deadline = time.monotonic() + 60
                while not json.load(urllib.request.urlopen(f"http://{box.host}/builds.json", timeout=5))["in_progress"]:
                    assert time.monotonic() < deadline, box.logs()[-6000:]
                    time.sleep(0.2)
            for pull in pulls:
                output = pull.communicate(timeout=300)[0]
                assert pull.returncode == 0, output
        finally:
            for pull in pulls:
                pull.kill()
            for name in names:
                subprocess.run(["docker", "rmi", "-f", f"{box.host}/{name}"], capture_output=True, timeout=120)
        entries = [json.loads(line) for line in box.logs().splitlines() if line.startswith("{")]
        started = [e["time"] for e in entries if e.get("message") == "build started"]
        built = [e["time"] for e in entries if e.get("message") == "image built"]
        assert len(started) == len(built) == 2, entries[-20:]
        assert started[1] >= built[0], (started, built)


def test_health_answers_within_a_second_while_every_thread_waits_on_a_build(image, rendered, tmp_path):
    """The base's NIXERY_THREADS, and twice that many requests waiting on one slow build: the
    liveness probe's /healthz still answers within 1 s (the kubelet would otherwise restart the
    pod, its Nix store and its builds with it)."""
    threads = int(settings(rendered)["NIXERY_THREADS"]) * int(settings(rendered)["NIXERY_WORKERS"])
    pkgs = make_package_set(tmp_path / "pkgs", salt=uuid.uuid4().hex, slow_seconds=15)
    with Running(image, pod_options(rendered, pkgs)) as box:
        box.wait_ready()
        answers: list[int] = []

        def wait_on_the_build() -> None:
            request = urllib.request.Request(f"http://{box.host}/v2/slowbuild/manifests/latest", headers={
                "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                answers.append(answer.status)

        waiting = [threading.Thread(target=wait_on_the_build) for _ in range(2 * threads)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 60
        while not json.load(urllib.request.urlopen(f"http://{box.host}/builds.json", timeout=5))["in_progress"]:
            assert time.monotonic() < deadline, box.logs()[-6000:]
            time.sleep(0.2)
        time.sleep(2)  # every request arrived and waits
        probes = []
        for _ in range(5):
            started = time.monotonic()
            assert box.get("/healthz", timeout=1) == 200
            probes.append(time.monotonic() - started)
            time.sleep(1)
        assert json.load(urllib.request.urlopen(f"http://{box.host}/builds.json", timeout=5))["in_progress"], \
            "the build ended before the probes: they proved nothing"
        for thread in waiting:
            thread.join(timeout=120)
        assert answers == [200] * len(waiting), answers
        print(f"/healthz answered in at most {max(probes) * 1000:.0f} ms with {len(waiting)} requests waiting")
