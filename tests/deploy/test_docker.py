"""The cpu image and the compose stack, really built and run on a private Docker engine (see docker_harness.py).

Marked `docker` and left out of `make test`: `make test-docker` runs them, and .ci/run does so on a fresh machine
after installing the engine. Where the engine or root is missing they skip, unless CLIPSERVE_REQUIRE_DOCKER=1
(set by `make test-docker`) turns that into a failure. Measurements (image size, cold build, time to ready) are
printed and written to build/docker-report.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.docker_harness import BASE_IMAGE, PrivateDocker, load_standin_images, missing_tools
from tests.service.conftest import free_port, shape_png

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
REPORT_FILE = ROOT / "build" / "docker-report.md"
CPU_IMAGE = "clipserve:cpu"
LABELS = "red circle, blue square, green triangle"
# What the build context holds (.dockerignore lets in only these).
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "service", "export", "models", "deploy/docker")


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, str]]:
    measured: dict[str, str] = {}
    yield measured
    if measured:
        lines = ["| measurement | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in measured.items())]
        REPORT_FILE.parent.mkdir(exist_ok=True)
        REPORT_FILE.write_text("# Docker measurements\n\n" + "\n".join(lines) + "\n")
        _progress("measured:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def docker() -> Iterator[PrivateDocker]:
    missing = missing_tools()
    if missing:
        message = f"the Docker tests need: {', '.join(missing)}"
        if os.environ.get("CLIPSERVE_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    engine = PrivateDocker()
    try:
        engine.start()
        load_standin_images(engine, _progress)
        yield engine
    finally:
        engine.stop()


def _image_mb(docker: PrivateDocker, image: str) -> float:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6


def _build(docker: PrivateDocker, context: Path, target: str, tag: str) -> tuple[float, str]:
    start = time.monotonic()
    result = docker("build", "--network=host", "--progress=plain", "--target", target, "-t", tag, str(context))
    return time.monotonic() - start, result.stderr


@pytest.fixture(scope="module")
def cpu_image(docker: PrivateDocker, report: dict[str, str]) -> str:
    _progress(f"building {CPU_IMAGE} (cold: an empty engine, dependencies from the package index)")
    seconds, _ = _build(docker, ROOT, "cpu", CPU_IMAGE)
    size, base = _image_mb(docker, CPU_IMAGE), _image_mb(docker, BASE_IMAGE)
    report["cpu image cold build"] = f"{seconds:.0f} s"
    report["cpu image size"] = f"{size:.0f} MB ({size - base:.0f} MB on top of the {base:.0f} MB stand-in base)"
    return CPU_IMAGE


def _wait_ready(url: str, timeout_s: float, alive=lambda: True) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"{url}/readyz did not turn 200 within {timeout_s} s")


@pytest.fixture(scope="module")
def cpu_container(docker: PrivateDocker, cpu_image: str, report: dict[str, str]) -> Iterator[tuple[str, str]]:
    port = free_port()
    name = f"clipserve-test-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    # The image's own defaults; only the port moves, because the engine has host networking only.
    docker("run", "-d", "--name", name, "--network=host", "-e", f"CLIPSERVE_PORT={port}", cpu_image)
    try:
        running = lambda: docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"  # noqa: E731
        try:
            _wait_ready(f"http://127.0.0.1:{port}", 120, running)
        except AssertionError:
            raise AssertionError(docker("logs", name, check=False).stderr[-3000:]) from None
        report["cpu container: docker run to /readyz 200"] = f"{time.monotonic() - start:.1f} s"
        yield name, f"http://127.0.0.1:{port}"
    finally:
        docker("rm", "-f", name, check=False)


def _classify_red_circle(url: str) -> list[str]:
    image = shape_png("circle", "red")
    response = httpx.post(
        f"{url}/classify", files={"image": ("circle.png", image, "image/png")}, data={"labels": LABELS}
    )
    assert response.status_code == 200, response.text
    return [entry["label"] for entry in response.json()["results"][0]["labels"]]


def test_cpu_image_classifies_a_red_circle(cpu_container: tuple[str, str]) -> None:
    _, url = cpu_container
    assert _classify_red_circle(url)[0] == "red circle"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "clipserve-demo"
    assert httpx.get(f"{url}/").status_code == 404  # the playground is off in the production image


def test_cpu_image_runs_as_a_non_root_user(docker: PrivateDocker, cpu_container: tuple[str, str]) -> None:
    name, _ = cpu_container
    assert docker("inspect", "-f", "{{.Config.User}}", name).stdout.strip() == "10001:10001"
    processes = docker("top", name, "-o", "pid,uid,cmd").stdout.splitlines()[1:]
    assert processes and all(line.split()[1] == "10001" for line in processes), processes
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"


def test_cpu_image_health_check_turns_healthy(docker: PrivateDocker, cpu_container: tuple[str, str]) -> None:
    name, _ = cpu_container
    deadline = time.monotonic() + 60  # the image checks every 10 s
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        if status == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"health status {status!r}: {docker('inspect', '-f', '{{json .State.Health}}', name).stdout}")


def test_a_code_only_change_rebuilds_without_reinstalling_dependencies(
    docker: PrivateDocker, cpu_image: str, report: dict[str, str], tmp_path: Path
) -> None:
    context = tmp_path / "context"
    for item in CONTEXT:
        source, target = ROOT / item, context / item
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    with open(context / "service" / "healthcheck.py", "a") as file:
        file.write("# a code-only change\n")
    seconds, log = _build(docker, context, "cpu", "clipserve:cpu-rebuild")
    # BuildKit's plain progress names a step on one line ("#9 [cpu-deps 4/4] RUN ./install.sh deps cpu") and
    # reports it on others under the same number ("#9 CACHED").
    step = next(line.split()[0] for line in log.splitlines() if line.endswith("RUN ./install.sh deps cpu"))
    assert f"{step} CACHED" in log.splitlines(), log[-3000:]
    assert f"{step} DONE" not in log, "the dependency layer was rebuilt"
    report["cpu image rebuild after a code-only change"] = f"{seconds:.0f} s"
    docker("rmi", "clipserve:cpu-rebuild")


def test_a_headless_locust_run_against_the_container_has_no_failures(
    cpu_container: tuple[str, str], tmp_path: Path
) -> None:
    _, url = cpu_container
    command = [sys.executable, "-m", "loadtests.run", "--host", url, "--run-time", "20s", "--users", "8"]
    result = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def host_network_compose(compose_file: Path, target: Path, clipserve_port: int) -> None:
    """docker-compose.yml for an engine with host networking only; everything else as the user gets it.

    Each service joins the host's network (no bridge network may be created) without published ports, and
    clipserve reaches Redis on 127.0.0.1 rather than by its service name; the ports come from the variables the
    compose file already reads.
    """
    spec = yaml.safe_load(compose_file.read_text())
    for service in spec["services"].values():
        service.pop("ports", None)
        service.pop("networks", None)
        service["network_mode"] = "host"
    environment = spec["services"]["clipserve"]["environment"]
    environment["CLIPSERVE_PORT"] = str(clipserve_port)
    environment["CLIPSERVE_REDIS_URL"] = "redis://127.0.0.1:${REDIS_PORT}/0"
    target.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_compose_stack_serves_and_caches_label_vectors_in_redis(
    docker: PrivateDocker, cpu_image: str, report: dict[str, str], tmp_path: Path
) -> None:
    clipserve_port, redis_port = free_port(), free_port()
    compose_file = tmp_path / "docker-compose.yml"
    host_network_compose(ROOT / "docker-compose.yml", compose_file, clipserve_port)
    project = f"clipserve-test-{uuid.uuid4().hex[:8]}"
    compose = ["-f", str(compose_file), "--project-directory", str(ROOT), "-p", project]
    env = {"REDIS_PORT": str(redis_port), "COMPOSE_PROFILES": "cpu"}
    start = time.monotonic()
    try:
        docker.compose(*compose, "up", "-d", "--no-build", "clipserve", "redis", env=env)
        try:
            _wait_ready(f"http://127.0.0.1:{clipserve_port}", 120)
        except AssertionError:
            raise AssertionError(docker.compose(*compose, "logs", env=env, check=False).stdout[-3000:]) from None
        report["compose up (redis healthy, then clipserve) to /readyz 200"] = f"{time.monotonic() - start:.1f} s"
        assert _classify_red_circle(f"http://127.0.0.1:{clipserve_port}")[0] == "red circle"

        def redis(*args: str) -> str:
            command = ["exec", "-T", "redis", "redis-cli", "-p", str(redis_port), *args]
            return docker.compose(*compose, *command, env=env).stdout.strip()

        assert int(redis("DBSIZE")) > 0  # the label vectors the classification computed
        assert redis("CONFIG", "GET", "maxmemory-policy").split() == ["maxmemory-policy", "allkeys-lru"]
        assert redis("CONFIG", "GET", "save").split() == ["save"]  # no snapshots: a cache, not a database
    finally:
        docker.compose(*compose, "down", "-v", env=env, check=False)
    project_label = f"label=com.docker.compose.project={project}"
    assert docker("ps", "-aq", "--filter", project_label).stdout.split() == []  # nothing left, running or not
    assert project not in docker("volume", "ls", "-q").stdout
    assert project not in docker("network", "ls", "--format", "{{.Name}}").stdout
