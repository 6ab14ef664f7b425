"""Kubernetes manifests validated offline against the schemas, the Dockerfile linted, and the
container's health probe run against a real server."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonpatch
import jsonschema
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


# Autoscaling: the HPA, the prometheus-adapter rules that feed it, and the KEDA overlay.

ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
KEDA = K8S / "overlays" / "keda"
# KEDA's CRD schema for ScaledObject's spec, written from kedacore/keda's CRD (see its $comment)
SCALEDOBJECT_SCHEMA = Path(__file__).parent / "keda-scaledobject.schema.json"


def exported_gauges() -> set[str]:
    """The gauges tserve exports: service.metrics.Metrics on a registry of its own."""
    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    return {family.name for family in registry.collect() if family.type == "gauge"}


def kustomize(overlay: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays (kubectl kustomize)"
    res = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def tserve_names(expr: str) -> set[str]:
    return set(re.findall(r"\btserve_[a-z_]+", expr))


def adapter_queries() -> dict[str, str]:
    """Each rule's metricsQuery as the adapter sends it for a Pods metric of pods a and b."""
    queries = {}
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]:
        series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
        queries[rule["name"]["as"]] = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="tserve",pod=~"tserve-a|tserve-b"')
            .replace("<<.GroupBy>>", "pod")
        )
    return queries


def scaled_object() -> dict:
    (found,) = [d for d in kustomize(KEDA) if d["kind"] == "ScaledObject"]
    return found


def test_the_hpa_reads_what_the_adapter_rules_expose_from_tserves_gauges():
    (hpa,) = docs(K8S / "base" / "hpa.yaml")
    read = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert read == {"tserve_queued_requests", "tserve_generation_active_sequences"}
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    assert {r["name"]["as"] for r in rules} == read
    gauges = exported_gauges()
    for rule in rules:
        # discovery: the rule's name regex must match the series it discovers
        (series,) = tserve_names(rule["seriesQuery"])
        assert re.search(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        used = tserve_names(rule["seriesQuery"] + rule["metricsQuery"])
        assert used <= gauges, f"not gauges tserve exports: {sorted(used - gauges)}"
    assert {"tserve_queue_depth", "tserve_generation_queued_requests"} <= tserve_names(
        adapter_queries()["tserve_queued_requests"]
    )


def test_keda_overlay_replaces_the_hpa_with_a_scaled_object_valid_against_kedas_crd(tmp_path):
    rendered = kustomize(KEDA)
    kinds = [d["kind"] for d in rendered]
    # KEDA owns the HPA it creates and refuses a target another HPA already scales
    assert "HorizontalPodAutoscaler" not in kinds and kinds.count("ScaledObject") == 1
    so = scaled_object()
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(so["spec"], json.loads(SCALEDOBJECT_SCHEMA.read_text()))
    spec = so["spec"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]  # the CRD's CEL rule
    (deployment_doc,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tserve"}
    assert spec["scaleTargetRef"]["name"] == deployment_doc["metadata"]["name"]
    (hpa,) = docs(K8S / "base" / "hpa.yaml")
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )
    # the same signals and per-pod thresholds as the HPA
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]}
    gauges = exported_gauges()
    namespace = deployment_doc["metadata"]["namespace"]
    thresholds = {}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        assert tserve_names(query) <= gauges and f'namespace="{namespace}"' in query and 'service="tserve"' in query
        thresholds[frozenset(tserve_names(query))] = trigger["metadata"]["threshold"]
    assert thresholds == {
        frozenset({"tserve_queue_depth", "tserve_generation_queued_requests"}): targets["tserve_queued_requests"],
        frozenset({"tserve_generation_active_sequences"}): targets["tserve_generation_active_sequences"],
    }
    # what is not custom renders valid against the Kubernetes schemas
    out = tmp_path / "keda.yaml"
    out.write_text(yaml.safe_dump_all([d for d in rendered if d["kind"] not in {"ScaledObject", *CRD_KINDS}]))
    validate(out)


def test_autoscaling_queries_compute_the_per_pod_signals(tmp_path):
    """promtool evaluates the adapter's and KEDA's queries on series shaped like a scrape:
    two tserve pods with two models each, and pods that must not count (another namespace,
    another Service)."""

    def series(name: str, pod: str, model: str, value: int, ns: str = "tserve", svc: str = "tserve") -> dict:
        labels = f'namespace="{ns}",service="{svc}",pod="{pod}",model="{model}",version="1"'
        return {"series": f"{name}{{{labels}}}", "values": f"{value}x8"}

    inputs = [
        series("tserve_queue_depth", "tserve-a", "bytegpt", 3),
        series("tserve_queue_depth", "tserve-a", "namegen", 1),
        series("tserve_generation_queued_requests", "tserve-a", "bytegpt", 10),
        series("tserve_generation_active_sequences", "tserve-a", "bytegpt", 32),
        series("tserve_generation_active_sequences", "tserve-a", "namegen", 4),
        series("tserve_queue_depth", "tserve-b", "bytegpt", 2),
        series("tserve_generation_queued_requests", "tserve-b", "bytegpt", 0),
        series("tserve_generation_active_sequences", "tserve-b", "bytegpt", 12),
        series("tserve_queue_depth", "tserve-c", "bytegpt", 100, ns="elsewhere"),
        series("tserve_generation_active_sequences", "tserve-c", "bytegpt", 100, ns="elsewhere"),
        series("tserve_queue_depth", "other-a", "bytegpt", 100, svc="other"),
        series("tserve_generation_active_sequences", "other-a", "bytegpt", 100, svc="other"),
    ]
    keda = {t["name"]: t["metadata"]["query"] for t in scaled_object()["spec"]["triggers"]}
    adapter = adapter_queries()

    def at_2m(expr: str, samples: list[tuple[str, int]]) -> dict:
        return {
            "expr": expr,
            "eval_time": "2m",
            "exp_samples": [{"labels": labels, "value": v} for labels, v in samples],
        }

    checks = [
        # the adapter: per pod (the other namespace's pod is outside the label matchers)
        at_2m(adapter["tserve_queued_requests"], [('{pod="tserve-a"}', 14), ('{pod="tserve-b"}', 2)]),
        at_2m(adapter["tserve_generation_active_sequences"], [('{pod="tserve-a"}', 36), ('{pod="tserve-b"}', 12)]),
        # KEDA: one sum over the deployment's pods, which KEDA divides by the replicas
        at_2m(keda["queued-requests"], [("{}", 16)]),
        at_2m(keda["active-sequences"], [("{}", 48)]),
    ]
    test = {"rule_files": [], "evaluation_interval": "15s"}
    test["tests"] = [{"interval": "15s", "input_series": inputs, "promql_expr_test": checks}]
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    res = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
