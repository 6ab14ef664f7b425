"""The container image, built with podman and run (make container-test).

No image registry is reachable, so the base image is a minimal Debian bookworm made with
debootstrap and imported into podman, and passed to the Dockerfile as BASE_IMAGE.
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

import numpy as np
import pytest
import tritonclient.grpc as tc

from deploy.local.cluster import free_port
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
