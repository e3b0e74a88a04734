"""`clipserve build-engines` / ensure_plans: TensorRT plans built on the serving GPU into an exported model.

TensorRT is FAKED (tests/export/test_tensorrt_build.py's FakeTensorRT: no GPU and no TensorRT wheel here) and so
is the GPU's identity; everything around them is real: a copy of the committed demo model, its manifest with
sha256 checks, file locks between concurrent builders, the CLI, the gpu image's entrypoint script, and the
service's choice of plans from the manifest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from export import tensorrt_build
from export.tensorrt_build import EngineBuildError, GpuInfo
from export.tensorrt_plans import LOCK_FILE, PlanDirectoryError, TensorRTOptions, ensure_plans
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import MANIFEST_FILE, load_manifest
from service.engines.factory import _tensorrt_plan
from service.engines.tensorrt import select_build
from tests.export.test_tensorrt_build import FakeBuilder, FakeTensorRT

ROOT = Path(__file__).resolve().parents[2]
H200 = GpuInfo("NVIDIA H200", "9.0")
L4 = GpuInfo("NVIDIA L4", "8.9")
OPTIONS = TensorRTOptions(precision="fp16", opt_batch=8, max_batch=16)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "repository" / EXPORT_NAME
    shutil.copytree(REPOSITORY_DIR / EXPORT_NAME, directory)
    return directory


def test_plans_are_built_once_and_recorded_where_the_service_finds_them(model_dir: Path):
    fake = FakeTensorRT(version="10.16.1")
    messages: list[str] = []
    build, built = ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200, progress=messages.append)
    assert built and fake.builds == 2  # one plan per tower
    assert build.directory == "tensorrt/sm90-trt10.16.1"
    assert (build.opt_batch, build.max_batch, build.precision) == (8, 16, "fp16")
    assert any("no TensorRT plans for NVIDIA H200" in m for m in messages)

    manifest = load_manifest(model_dir, verify=True)  # the plans' sha256 are recorded and match
    assert select_build(manifest, "9.0", "10.16.1") == build
    for role, input_name in (("image", "pixels"), ("text", "token_ids")):
        plan = model_dir / _tensorrt_plan(manifest, build, role).path
        assert plan.read_bytes().startswith(f"FAKE-PLAN {role}.onnx".encode())
        assert any(shape[0] == input_name for shape in fake.profile_shapes)

    again, built_again = ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200)
    assert (again, built_again, fake.builds) == (build, False, 2)  # the second start finds them


def test_another_gpu_family_adds_its_own_build(model_dir: Path):
    ensure_plans(model_dir, OPTIONS, trt=FakeTensorRT(version="10.16.1"), gpu=H200)
    ensure_plans(model_dir, OPTIONS, trt=FakeTensorRT(version="10.16.1"), gpu=L4)
    manifest = load_manifest(model_dir, verify=True)
    assert [b.directory for b in manifest.tensorrt] == ["tensorrt/sm90-trt10.16.1", "tensorrt/sm89-trt10.16.1"]
    assert select_build(manifest, "8.9", "10.16.1").gpu_name == "NVIDIA L4"


def test_a_failed_build_leaves_the_model_as_it_was(model_dir: Path):
    before = (model_dir / MANIFEST_FILE).read_bytes()
    with pytest.raises(EngineBuildError):
        ensure_plans(model_dir, OPTIONS, trt=FakeTensorRT(build_returns_none=True), gpu=H200)
    assert (model_dir / MANIFEST_FILE).read_bytes() == before
    load_manifest(model_dir, verify=True)


class SlowBuilder(FakeBuilder):
    def build_serialized_network(self, network, config):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # long enough for the second replica to arrive while the first builds
        return super().build_serialized_network(network, config)


def test_replicas_starting_together_build_once(model_dir: Path):
    fake = FakeTensorRT()
    fake.Builder = lambda logger: SlowBuilder(fake, logger)  # type: ignore[method-assign]
    results: list[tuple[object, bool]] = []
    waited: list[str] = []

    def replica() -> None:
        results.append(ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200, progress=waited.append))

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(built for _, built in results) == [False, True]
    assert results[0][0] == results[1][0] and fake.builds == 2
    assert any("another process is building plans" in message for message in waited)


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """The directory made read-only for real: a read-only bind mount (root, as in CI) or mode 0555."""
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", directory, directory], capture_output=True).returncode:
            pytest.skip("cannot bind-mount read-only here")
        try:
            yield
        finally:
            subprocess.run(["umount", directory], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


def test_a_read_only_model_directory_is_explained(model_dir: Path):
    with read_only(model_dir), pytest.raises(PlanDirectoryError, match="must be a writable volume"):
        ensure_plans(model_dir, OPTIONS, trt=FakeTensorRT(), gpu=H200)
    assert not (model_dir / LOCK_FILE).exists()


def _cli(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    import typer

    from export.cli import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["build-engines", *args], env=env)


def test_cli_builds_for_the_model_the_service_would_serve(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeTensorRT(version="10.16.1")
    monkeypatch.setattr(tensorrt_build, "load_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: H200)
    # The gpu image's environment: the repository on the volume, an empty CLIPSERVE_MODEL meaning unset.
    env = {"CLIPSERVE_MODEL_REPOSITORY": str(model_dir.parent), "CLIPSERVE_MODEL": "", "CLIPSERVE_MAX_BATCH_SIZE": "8"}
    first = _cli([], env)
    assert first.exit_code == 0, first.output
    assert "built TensorRT plans" in first.output and "sm90-trt10.16.1" in first.output
    assert load_manifest(model_dir).tensorrt[0].opt_batch == 8
    second = _cli([], env)
    assert second.exit_code == 0 and "found TensorRT plans" in second.output and fake.builds == 2


def test_cli_without_tensorrt_exits_2_with_the_reason(model_dir: Path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    result = _cli(["--repository", str(model_dir.parent)], {})
    assert result.exit_code == 2
    assert "TensorRT is not installed here" in result.output


ENTRYPOINT = ROOT / "deploy" / "docker" / "gpu-entrypoint.sh"


def _entrypoint(tmp_path: Path, engine: str, clipserve_exit: int) -> subprocess.CompletedProcess[str]:
    """The gpu image's entrypoint with a stand-in `clipserve` on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "clipserve"
    stand_in.write_text(f'#!/bin/sh\necho "clipserve $*" >> {tmp_path}/calls\nexit {clipserve_exit}\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CLIPSERVE_ENGINE": engine}
    return subprocess.run([str(ENTRYPOINT), "sh", "-c", "echo serving"], env=env, capture_output=True, text=True)


def test_gpu_entrypoint_builds_plans_then_runs_the_command(tmp_path: Path):
    result = _entrypoint(tmp_path, "tensorrt", clipserve_exit=0)
    assert result.returncode == 0 and result.stdout.strip() == "serving"
    assert (tmp_path / "calls").read_text() == "clipserve build-engines\n"


def test_gpu_entrypoint_stops_when_the_plans_cannot_be_built(tmp_path: Path):
    result = _entrypoint(tmp_path, "tensorrt", clipserve_exit=2)
    assert result.returncode == 2 and "serving" not in result.stdout


def test_gpu_entrypoint_builds_nothing_for_another_engine(tmp_path: Path):
    result = _entrypoint(tmp_path, "onnxruntime", clipserve_exit=2)
    assert result.returncode == 0 and result.stdout.strip() == "serving"
    assert not (tmp_path / "calls").exists()


def test_gpu_entrypoint_with_the_real_cli_on_this_gpu_less_machine(tmp_path: Path):
    """No stand-in: the installed `clipserve` refuses with the reason and the server is not started."""
    clipserve = Path(sys.executable).with_name("clipserve")
    if not clipserve.exists():
        pytest.skip("clipserve is not installed in this environment")
    env = {**os.environ, "PATH": f"{clipserve.parent}:{os.environ['PATH']}", "CLIPSERVE_ENGINE": "tensorrt"}
    result = subprocess.run([str(ENTRYPOINT), "echo", "serving"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "serving" not in result.stdout
    assert "TensorRT is not installed here" in result.stderr
