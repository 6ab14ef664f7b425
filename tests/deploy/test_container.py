"""The container image, built with podman and run (make container-test), alone and as the
rendered Kubernetes manifests under `podman kube play`.

No image registry is reachable, so the base image is a minimal Debian bookworm made with
debootstrap and imported into podman, and passed to the Dockerfile as BASE_IMAGE.

What `podman kube play` (4.3, Debian bookworm's) does with the rendered cpu overlay: it runs
the Deployment as pods (each replica on this one host, so one here), applies the security
context (uid/gid, read-only root, no new privileges, capabilities dropped), sets the limits as
cgroup limits, mounts the emptyDirs as anonymous volumes and publishes hostPorts; it skips the
Services, the HPA, the PDB and the ServiceMonitor ("kind not supported"). Of the probes it
implements only livenessProbe, and only exec, httpGet and tcpSocket: the gRPC probes are dropped
without a word, and readinessProbe and startupProbe are never read; nor does it take the
image's HEALTHCHECK (as `podman run` does), so the container has no health check and nothing in
podman gates readiness. This test plays kubelet for the readiness probe: it sends the probe's
grpc.health.v1 Check to the probe's port within the startup probe's budget (and runs the same
Check inside the pod, as the secure overlay's exec probes do). preStop and
terminationGracePeriodSeconds are ignored too (the test stops the pod with the manifest's grace
itself). Not checked here at all: the HPA and its adapter metrics, the
ServiceMonitor scrape, the PDB, Service load-balancing (headless DNS), probe semantics (a failing
readiness probe taking the pod out of endpoints, liveness restarts), resource requests
(scheduling), fsGroup, emptyDir size limits and seccomp RuntimeDefault (podman applies its own
default profile); tests/deploy/test_manifests.py checks those manifests offline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.cluster import free_port
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from tests.conftest import BYTEGPT_VOCAB, ROOT

pytestmark = pytest.mark.container

BASE = "localhost/tserve-base:bookworm"
IMAGE = "localhost/tserve:test"
CERTS = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> list[str]:
    if not all(shutil.which(t) for t in ("podman", "runc", "debootstrap")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "podman", "buildah", "runc", "debootstrap"],
            check=True,
            env=env,
            capture_output=True,
        )
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)
    return ["podman", "--storage-driver=vfs", "--runtime", "runc"]


def run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(cmd[:6])}...:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def image(podman) -> str:
    if subprocess.run([*podman, "image", "exists", BASE]).returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = os.path.join(tmp, "rootfs")
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                    "bookworm",
                    rootfs,
                    "http://deb.debian.org/debian",
                ]
            )
            archive = os.path.join(tmp, "rootfs.tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(rootfs, arcname=".")
            run([*podman, "import", archive, BASE])
    # docker format: OCI images have no HEALTHCHECK
    build = [
        *podman,
        "build",
        "--format",
        "docker",
        "--isolation=chroot",
        "--network=host",
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        "-t",
        IMAGE,
    ]
    if os.path.exists(CERTS):  # where TLS is intercepted, pip in the build needs the host's CA bundle
        build += ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--build-arg", f"PIP_CERT={CERTS}"]
    run([*build, str(ROOT)])
    return IMAGE


def test_image_serves_checks_health_and_drains_on_sigterm(podman, image):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    name = f"tserve-test-{os.getpid()}"
    # ports through the environment, so the image's HEALTHCHECK probes the same one
    run(
        [
            *podman,
            "run",
            "-d",
            "--network=host",
            "--name",
            name,
            "-e",
            f"TSERVE_GRPC_PORT={grpc_port}",
            "-e",
            f"TSERVE_HTTP_PORT={http_port}",
            "-e",
            f"TSERVE_METRICS_PORT={metrics_port}",
            "-e",
            "TSERVE_HOST=127.0.0.1",
            image,
        ]
    )
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, run([*podman, "logs", name]).stderr
            time.sleep(0.2)
        # the image's own HEALTHCHECK, through the gRPC health service
        run([*podman, "healthcheck", "run", name])
        ids = np.arange(6, dtype=np.int64)[None]
        x = tc.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        assert client.infer("bytegpt", [x]).as_numpy("logits").shape == (1, 6, BYTEGPT_VOCAB)
        client.close()
        body = json.dumps({"model": "bytegpt", "prompt": "def", "max_tokens": 3}).encode()
        answer = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body))
        assert json.loads(answer.read())["usage"]["completion_tokens"] == 3  # HTTP and the OpenAI API
        user = run([*podman, "exec", name, "id", "-u"]).stdout.strip()
        assert user == "10001"
        run([*podman, "kill", "--signal", "TERM", name])
        code = run([*podman, "wait", name], timeout=60).stdout.strip()
        assert code == "0"
        logs = run([*podman, "logs", name])
        assert "draining" in logs.stdout + logs.stderr
        size = run([*podman, "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()
        print(f"image size: {int(size) / 1e6:.0f} MB")
    finally:
        subprocess.run([*podman, "rm", "-f", name], capture_output=True)


def render_for_kube_play(overlay: str, ports: dict[int, int]) -> tuple[str, dict]:
    """`kubectl kustomize` of an overlay, changed only where podman needs it; the Deployment."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (kubectl kustomize)"
    rendered = run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)]).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    # kube play makes every replica on this one host, each binding the same host ports
    deployment["spec"]["replicas"] = 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # the image this module built, not the release tag (nothing can be pulled here)
    container["image"] = IMAGE
    # kube play publishes a containerPort on the same host port when hostPort is unset; free
    # ones instead, since servers on this machine may hold 8000-8002. Container ports (and so
    # the probes' port 8001) stay as rendered.
    for port in container["ports"]:
        port["hostPort"] = ports[port["containerPort"]]
    return yaml.safe_dump_all(docs), deployment


def test_rendered_manifests_run_under_podman_kube_play(podman, image, tmp_path):
    ports = {8000: free_port(), 8001: free_port(), 8002: free_port()}
    manifest, deployment = render_for_kube_play("cpu", ports)
    (tmp_path / "tserve.yaml").write_text(manifest)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    startup, readiness = container["startupProbe"], container["readinessProbe"]
    assert startup["grpc"]["port"] == readiness["grpc"]["port"] == 8001

    def names(what: str) -> set[str]:
        return set(run([*podman, what, "ls", "--format", "{{.Name}}"]).stdout.split())

    networks, volumes = names("network"), names("volume")
    pod = ctr = "none"
    try:
        ids = run([*podman, "kube", "play", str(tmp_path / "tserve.yaml")], timeout=300).stdout.split()
        pod = ids[ids.index("Pod:") + 1]
        (ctr,) = ids[ids.index("Container:") + 1 :]
        # the readiness probe as kubelet sends it (grpc.health.v1 Check on the probe's port),
        # within the startup probe's budget
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        with grpc.insecure_channel(f"127.0.0.1:{ports[readiness['grpc']['port']]}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, run([*podman, "logs", ctr]).stderr[-3000:]
                time.sleep(readiness["periodSeconds"] / 5)
        # the same Check from inside the pod, as the secure overlay's exec probes run it
        assert "SERVING" in run([*podman, "exec", ctr, "python3", "-m", "service.healthcheck"]).stdout
        # podman 4.3 drops the gRPC liveness probe and, under kube play, does not take the image's
        # HEALTHCHECK either: the container has no health check. A podman that makes one gets it run.
        config = json.loads(run([*podman, "inspect", ctr]).stdout)[0]["Config"]
        if config.get("Healthcheck"):
            run([*podman, "healthcheck", "run", ctr])
            assert run([*podman, "inspect", "--format", "{{.State.Health.Status}}", ctr]).stdout.strip() == "healthy"
        print(f"podman's health check for the pod: {config.get('Healthcheck')}")
        # the security context as applied: uid and gid 10001, read-only root, writable emptyDirs
        assert run([*podman, "exec", ctr, "id", "-u"]).stdout.strip() == "10001"
        assert run([*podman, "exec", ctr, "id", "-g"]).stdout.strip() == "10001"
        host = json.loads(run([*podman, "inspect", ctr]).stdout)[0]["HostConfig"]
        assert host["ReadonlyRootfs"] is True and "no-new-privileges" in host["SecurityOpt"]
        assert container["resources"]["limits"]["memory"] == "1Gi" and host["Memory"] == 2**30
        proc = run([*podman, "exec", ctr, "cat", "/proc/self/status"]).stdout.splitlines()
        process = dict(line.split(":\t", 1) for line in proc)
        assert int(process["CapEff"], 16) == 0 and process["NoNewPrivs"] == "1" and process["Seccomp"] == "2"
        mounts = run([*podman, "exec", ctr, "cat", "/proc/self/mounts"]).stdout.splitlines()
        (root,) = [m.split() for m in mounts if m.split()[1] == "/"]
        assert root[3].split(",")[0] == "ro"
        for mount in container["volumeMounts"]:
            run([*podman, "exec", ctr, "touch", f"{mount['mountPath']}/written"])
        # an inference (KServe v2 gRPC) and a generation (TextGeneration) through published ports
        client = tc.InferenceServerClient(f"127.0.0.1:{ports[8001]}")
        token_ids = np.arange(6, dtype=np.int64)[None]
        x = tc.InferInput("input_ids", list(token_ids.shape), "INT64")
        x.set_data_from_numpy(token_ids)
        assert client.infer("bytegpt", [x]).as_numpy("logits").shape == (1, 6, BYTEGPT_VOCAB)
        client.close()
        with grpc.insecure_channel(f"127.0.0.1:{ports[8001]}") as channel:
            request = gen.GenerateRequest(model="bytegpt", text="def ", max_new_tokens=4, ignore_eos=True)
            answer = gen_grpc.TextGenerationStub(channel).Generate(request, timeout=60)
        assert len(answer.token_ids) == answer.usage.generated_tokens == 4
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[8002]}/metrics").read().decode()
        assert "tserve_generation_queued_requests" in metrics and "tserve_queue_depth" in metrics
        # SIGTERM (the image's STOPSIGNAL) drains; the grace is the manifest's, which podman ignores
        run([*podman, "pod", "stop", "-t", str(spec["terminationGracePeriodSeconds"]), pod], timeout=60)
        assert run([*podman, "inspect", "--format", "{{.State.ExitCode}}", ctr]).stdout.strip() == "0"
        logs = run([*podman, "logs", ctr])
        assert "draining" in logs.stdout + logs.stderr
    finally:
        down = subprocess.run(
            [*podman, "kube", "down", str(tmp_path / "tserve.yaml")], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    # nothing left: the pod, its containers (infra included) and the emptyDir volumes are gone;
    # kube play's shared network (podman-default-kube-network) stays, as podman's default one does
    assert subprocess.run([*podman, "pod", "exists", pod]).returncode == 1
    assert subprocess.run([*podman, "container", "exists", ctr]).returncode == 1
    left = run([*podman, "ps", "-a", "--format", "{{.Pod}}"]).stdout.split()
    assert not [p for p in left if pod.startswith(p) or p.startswith(pod)]
    assert names("volume") == volumes
    assert names("network") <= networks | {"podman-default-kube-network"}
