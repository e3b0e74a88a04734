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
    assert any("building fp16 plans" in m and "it has no TensorRT plans for this GPU" in m for m in messages)

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
    assert not list(model_dir.glob(".tensorrt-staging-*"))


class TextFailsBuilder(FakeBuilder):
    def build_serialized_network(self, network, config):  # type: ignore[no-untyped-def]
        # The image plan is written first; the text build then fails, halfway through the rebuild.
        return None if Path(network.source).name == "text.onnx" else super().build_serialized_network(network, config)


def test_a_failed_rebuild_keeps_the_stale_plans_the_manifest_records(model_dir: Path):
    fp16, _ = ensure_plans(model_dir, OPTIONS, trt=FakeTensorRT(), gpu=H200)
    before = (model_dir / MANIFEST_FILE).read_bytes()
    failing = FakeTensorRT()
    failing.Builder = lambda logger: TextFailsBuilder(failing, logger)  # type: ignore[method-assign]
    with pytest.raises(EngineBuildError):
        bf16 = TensorRTOptions(precision="bf16", opt_batch=8, max_batch=16)
        ensure_plans(model_dir, bf16, trt=failing, gpu=H200)
    assert failing.serialized  # the image plan of the rebuild was written before the text build failed
    assert (model_dir / MANIFEST_FILE).read_bytes() == before
    assert load_manifest(model_dir, verify=True).tensorrt == (fp16,)  # the fp16 plans are intact and verify
    assert not list(model_dir.glob(".tensorrt-staging-*"))


class WaitingBuilder(FakeBuilder):
    """Builds only once the other replica is waiting for the lock: the two overlap however loaded the machine."""

    def __init__(self, trt, logger, other_waits: threading.Event) -> None:  # type: ignore[no-untyped-def]
        super().__init__(trt, logger)
        self.other_waits = other_waits

    def build_serialized_network(self, network, config):  # type: ignore[no-untyped-def]
        assert self.other_waits.wait(timeout=60), "the second replica never waited for the first one's build"
        return super().build_serialized_network(network, config)


def test_replicas_starting_together_build_once(model_dir: Path):
    fake, other_waits = FakeTensorRT(), threading.Event()
    fake.Builder = lambda logger: WaitingBuilder(fake, logger, other_waits)  # type: ignore[method-assign]
    results: list[tuple[object, bool]] = []
    waited: list[str] = []

    def progress(message: str) -> None:
        waited.append(message)
        if "another process is building plans" in message:
            other_waits.set()

    def replica() -> None:
        results.append(ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200, progress=progress))

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
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


def test_other_precision_or_larger_batches_rebuild_in_place(model_dir: Path):
    fake = FakeTensorRT(version="10.16.1")
    ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200)
    messages: list[str] = []
    bf16, built = ensure_plans(
        model_dir,
        TensorRTOptions(precision="bf16", opt_batch=8, max_batch=16),
        trt=fake,
        gpu=H200,
        progress=messages.append,
    )
    assert built and bf16.precision == "bf16" and fake.builds == 4
    assert any("its plans for this GPU are fp16 for batches up to 16" in m for m in messages)
    bigger, built = ensure_plans(
        model_dir, TensorRTOptions(precision="bf16", opt_batch=8, max_batch=128), trt=fake, gpu=H200
    )
    assert built and bigger.max_batch == 128 and fake.builds == 6
    smaller, built = ensure_plans(
        model_dir, TensorRTOptions(precision="bf16", opt_batch=8, max_batch=64), trt=fake, gpu=H200
    )
    assert not built and smaller == bigger  # plans for up to 128 serve batches up to 64
    manifest = load_manifest(model_dir, verify=True)
    assert manifest.tensorrt == (bigger,)  # one record per directory: the stale one was replaced
    assert len([a for a in manifest.artifacts if a.format == "tensorrt"]) == 2


def test_a_read_only_volume_with_plans_built_ahead_starts(model_dir: Path):
    fake = FakeTensorRT()
    build, _ = ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200)
    (model_dir / LOCK_FILE).unlink()
    with read_only(model_dir):
        assert ensure_plans(model_dir, OPTIONS, trt=fake, gpu=H200) == (build, False)
    assert fake.builds == 2 and not (model_dir / LOCK_FILE).exists()


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


def test_cli_refuses_an_unknown_precision_and_one_the_gpu_lacks(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tensorrt_build, "load_tensorrt", lambda: FakeTensorRT())
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: GpuInfo("Tesla T4", "7.5"))
    env = {"CLIPSERVE_MODEL_REPOSITORY": str(model_dir.parent)}
    unknown = _cli(["--precision", "int8"], env)
    assert unknown.exit_code == 2 and "choose one of fp32, fp16, bf16" in unknown.output
    too_new = _cli([], {**env, "CLIPSERVE_TENSORRT_PRECISION": "bf16"})
    assert too_new.exit_code == 2 and "needs an Ampere or newer GPU" in too_new.output
    assert load_manifest(model_dir).tensorrt == ()


def test_cli_reads_the_shared_settings_and_refuses_invalid_ones_in_one_line(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same CLIPSERVE_* variables and checks as the service (models.settings.SharedSettings), not typer's own."""
    monkeypatch.setattr(tensorrt_build, "load_tensorrt", lambda: FakeTensorRT())
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: H200)
    env = {"CLIPSERVE_MODEL_REPOSITORY": str(model_dir.parent), "CLIPSERVE_MAX_BATCH_SIZE": "0"}
    refused = _cli([], env)
    assert refused.exit_code == 2
    assert refused.output.splitlines() == [
        "clipserve build-engines: invalid settings:",
        "  CLIPSERVE_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1",
    ]
    assert load_manifest(model_dir).tensorrt == ()
    built = _cli([], {**env, "CLIPSERVE_MAX_BATCH_SIZE": "4", "CLIPSERVE_TENSORRT_PRECISION": "fp32"})
    assert built.exit_code == 0, built.output
    (build,) = load_manifest(model_dir).tensorrt
    assert (build.precision, build.opt_batch) == ("fp32", 4)


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


def _entrypoint(
    tmp_path: Path, engine: str | None, clipserve_exit: int, command: tuple[str, ...] = ("clipserve", "serve")
) -> subprocess.Popen[str]:
    """The gpu image's entrypoint with a stand-in `clipserve` on PATH: it records its arguments, and as `serve`
    prints "serving"; as `build-engines` it exits with `clipserve_exit` (after CLIPSERVE_TEST_BUILD_S seconds)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "clipserve"
    stand_in.write_text(
        "#!/bin/sh\n"
        f'echo "clipserve $*" >> {tmp_path}/calls\n'
        'if [ "$1" = serve ]; then echo serving; exit 0; fi\n'
        'if [ -n "${CLIPSERVE_TEST_BUILD_S:-}" ]; then exec sleep "$CLIPSERVE_TEST_BUILD_S"; fi\n'
        f"exit {clipserve_exit}\n"
    )
    stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CLIPSERVE_ENGINE"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    if engine is not None:
        env["CLIPSERVE_ENGINE"] = engine
    if command == ("slow",):
        env["CLIPSERVE_TEST_BUILD_S"], command = "30", ("clipserve", "serve")
    return subprocess.Popen([str(ENTRYPOINT), *command], env=env, stdout=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    stdout, _ = process.communicate(timeout=60)
    return process.returncode, stdout.strip()


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_gpu_entrypoint_builds_plans_then_serves(tmp_path: Path):
    assert _finish(_entrypoint(tmp_path, "tensorrt", clipserve_exit=0)) == (0, "serving")
    assert _calls(tmp_path) == ["clipserve build-engines", "clipserve serve"]


def test_gpu_entrypoint_stops_when_the_plans_cannot_be_built(tmp_path: Path):
    assert _finish(_entrypoint(tmp_path, "tensorrt", clipserve_exit=2)) == (2, "")
    assert _calls(tmp_path) == ["clipserve build-engines"]


@pytest.mark.parametrize("engine", ["onnxruntime", "", None])
def test_gpu_entrypoint_builds_nothing_for_another_engine(tmp_path: Path, engine: str | None):
    """Empty or unset means onnxruntime, as in Settings."""
    assert _finish(_entrypoint(tmp_path, engine, clipserve_exit=2)) == (0, "serving")
    assert _calls(tmp_path) == ["clipserve serve"]


def test_gpu_entrypoint_runs_other_commands_without_building(tmp_path: Path):
    process = _entrypoint(tmp_path, "tensorrt", clipserve_exit=2, command=("sh", "-c", "echo a shell"))
    assert _finish(process) == (0, "a shell") and _calls(tmp_path) == []


def test_gpu_entrypoint_passes_sigterm_to_a_build_in_progress(tmp_path: Path):
    process = _entrypoint(tmp_path, "tensorrt", clipserve_exit=0, command=("slow",))
    deadline = time.monotonic() + 10
    while _calls(tmp_path) != ["clipserve build-engines"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the shell reach `wait`
    start = time.monotonic()
    process.terminate()
    returncode, stdout = _finish(process)
    assert time.monotonic() - start < 10  # not the 30 s the build would have taken
    assert returncode != 0 and stdout == "" and _calls(tmp_path) == ["clipserve build-engines"]


def test_gpu_entrypoint_with_the_real_cli_on_this_gpu_less_machine(tmp_path: Path):
    """No stand-in: the installed `clipserve` refuses with the reason and the server is not started."""
    clipserve = Path(sys.executable).with_name("clipserve")
    if not clipserve.exists():
        pytest.skip("clipserve is not installed in this environment")
    env = {**os.environ, "PATH": f"{clipserve.parent}:{os.environ['PATH']}", "CLIPSERVE_ENGINE": "tensorrt"}
    command = [str(ENTRYPOINT), "clipserve", "serve", "--port", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "TensorRT is not installed here" in result.stderr and "Uvicorn running" not in result.stderr
