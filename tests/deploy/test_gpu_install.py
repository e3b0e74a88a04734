"""Each install resolves to exactly one ONNX Runtime build.

`onnxruntime` and `onnxruntime-gpu` install the same `onnxruntime` module and overwrite each other, so whichever
lands last decides whether the GPU is used; ONNX Runtime's documentation says to install only one. The extras
`cpu` and `gpu` each pick one. These tests ask pip to resolve the installs for real (`--dry-run --report`,
against the package index), including the export toolchain a GPU export machine adds.

TensorRT's PyPI packages are stubs that download their libraries from NVIDIA's own host while pip resolves them,
and that host cannot be reached here; a local stand-in wheel of `tensorrt-cu13` without dependencies takes their
place. Its real dependencies are NVIDIA's TensorRT libraries and bindings only, never ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TENSORRT_STAND_IN = ("tensorrt_cu13", "10.99.0")  # inside the gpu extra's range, above any real 10.x release


def _stand_in_wheel(directory: Path) -> None:
    name, version = TENSORRT_STAND_IN
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: clipserve-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")


def resolve(extras: str, tmp_path: Path) -> set[str]:
    """Names of every distribution `pip install '.[extras]'` would install into an empty environment."""
    _stand_in_wheel(tmp_path)
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    command += ["--report", str(report), "--find-links", str(tmp_path), f"{ROOT}[{extras}]"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("extras", ["gpu", "gpu,export"])
def test_the_gpu_install_has_onnxruntime_gpu_alone(extras: str, tmp_path: Path):
    names = resolve(extras, tmp_path)
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in names, "plain onnxruntime would overwrite onnxruntime-gpu's module"
    assert {"tensorrt-cu13", "cuda-bindings"} <= names


def test_the_cpu_install_has_plain_onnxruntime_alone(tmp_path: Path):
    names = resolve("cpu", tmp_path)
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert "torch" not in names  # the serving install stays torch-free
