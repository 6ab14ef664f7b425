"""Kubernetes manifests validated offline against the schemas, the Dockerfile linted, and the
container's health probe run against a real server."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonpatch
import yaml

from tests.conftest import DEFAULT_REPOSITORY, ROOT
from service.launcher import ServerProcess

K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
CRD_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}  # no offline schemas for these


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(*files: Path) -> None:
    res = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *map(str, files)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout + res.stderr


def base_resources() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [K8S / "base" / r for r in kustomization["resources"]]


def test_base_manifests_validate_against_the_kubernetes_schemas():
    files = [f for f in base_resources() if all(d["kind"] not in CRD_KINDS for d in docs(f))]
    assert {d["kind"] for f in files for d in docs(f)} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    validate(*files)


def test_custom_resources_are_well_formed():
    found = {
        d["kind"]: d
        for f in [*base_resources(), *(ROOT / "deploy" / "kserve").glob("*.yaml")]
        for d in docs(f)
        if d["kind"] in CRD_KINDS
    }
    assert set(found) == CRD_KINDS
    assert found["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert "grpc-v2" in found["ServingRuntime"]["spec"]["protocolVersions"]
    assert (
        found["InferenceService"]["spec"]["predictor"]["model"]["runtime"]
        == found["ServingRuntime"]["metadata"]["name"]
    )


def deployment() -> dict:
    return docs(K8S / "base" / "deployment.yaml")[0]


def test_gpu_overlay_renders_to_a_valid_deployment(tmp_path):
    overlay = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    patch = jsonpatch.JsonPatch(yaml.safe_load((K8S / "overlays" / "gpu" / overlay["patches"][0]["path"]).read_text()))
    rendered = patch.apply(copy.deepcopy(deployment()))
    container = rendered["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "TSERVE_EXECUTION_PROVIDER", "value": "cuda"} in container["env"]
    out = tmp_path / "gpu-deployment.yaml"
    out.write_text(yaml.safe_dump(rendered))
    validate(out)


def test_secure_overlay_mounts_the_secrets_and_probes_over_tls(tmp_path):
    overlay = yaml.safe_load((K8S / "overlays" / "secure" / "kustomization.yaml").read_text())
    patch = jsonpatch.JsonPatch(
        yaml.safe_load((K8S / "overlays" / "secure" / overlay["patches"][0]["path"]).read_text())
    )
    rendered = patch.apply(copy.deepcopy(deployment()))
    spec = rendered["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TSERVE_TLS_CERT_FILE"]["value"].startswith("/etc/tserve/tls/")
    assert env["TSERVE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tserve-auth"
    assert {"name": "tls", "secret": {"secretName": "tserve-tls", "defaultMode": 0o440}} in spec["volumes"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["python3", "-m", "service.healthcheck"]
    out = tmp_path / "secure-deployment.yaml"
    out.write_text(yaml.safe_dump(rendered))
    validate(out)


def test_deployment_is_restricted_and_drains_within_its_grace():
    spec = deployment()["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] and pod["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 8001
    drain = float(next(e["value"] for e in c["env"] if e["name"] == "TSERVE_DRAIN_GRACE_SECONDS"))
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_dockerfile_lints_clean_and_keeps_its_promises():
    res = subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "EXPOSE 8000 8001 8002" in text and "USER 10001" in text
    assert "HEALTHCHECK" in text and "service.healthcheck" in text and "torch" not in text.split("FROM")[-1]


def test_container_health_probe_against_a_real_server():
    with ServerProcess(DEFAULT_REPOSITORY) as server:
        ok = subprocess.run(
            [sys.executable, "-m", "service.healthcheck", server.address],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0 and "SERVING" in ok.stdout
        address = server.address
    down = subprocess.run(
        [sys.executable, "-m", "service.healthcheck", address], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert down.returncode == 1 and "unhealthy" in down.stderr
