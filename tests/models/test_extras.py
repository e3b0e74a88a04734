"""Commands that need an optional extra print one install line and exit 2 when it is missing (issue 10, point 8),
and TensorRT, which the engine builder and the service both import through `load_tensorrt`.

The slim install (`make serve`) lacks torch, open_clip and onnx; here they are made unimportable the same way
(`sys.modules[name] = None`), and the real `clipserve` CLI runs in a subprocess.
"""

from __future__ import annotations

import builtins
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from models.extras import TensorRTUnavailableError, load_tensorrt, needs_extras

BLOCKED = ["torch", "torchvision", "open_clip", "onnx", "onnxscript", "transformers"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "; ".join(
        [
            "import sys",
            *[f"sys.modules[{name!r}] = None" for name in BLOCKED],
            f"sys.argv = ['clipserve', *{list(args)!r}]",
            "from service.cli import main",
            "main()",
        ]
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ("export", "--demo", "--repository", "{tmp}"),
        ("train-demo", "--steps", "1", "--output", "{tmp}"),
        ("eval-demo",),
    ],
)
def test_a_command_without_its_extra_says_what_to_install(args: tuple[str, ...], tmp_path: Path) -> None:
    result = run_cli(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith(f"clipserve {args[0]}: needs ") and "pip install 'clipserve[cpu,export]'" in lines[0]


def test_help_works_without_the_extra() -> None:
    result = run_cli("export", "--help")
    assert result.returncode == 0, result.stderr
    assert "--repository" in result.stdout


def test_other_import_errors_are_not_hidden() -> None:
    app = typer.Typer()

    @app.command()
    @needs_extras("broken", "export")
    def broken() -> None:
        import clipserve_no_such_module  # type: ignore[import-not-found]  # noqa: F401

    result = CliRunner().invoke(app, [])
    assert isinstance(result.exception, ModuleNotFoundError)


def test_load_tensorrt_explains_missing_tensorrt(monkeypatch: pytest.MonkeyPatch):
    # A None entry makes `import tensorrt` raise ImportError even where TensorRT is installed.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError) as raised:
        load_tensorrt()
    message = str(raised.value)
    assert "TensorRT is not installed" in message
    assert "clipserve[gpu]" in message
    assert "NVIDIA GPU" in message
    assert "onnx, onnx-fp16, onnx-int8" in message


def test_load_tensorrt_reports_broken_native_libraries(monkeypatch: pytest.MonkeyPatch):
    real_import = builtins.__import__

    def failing_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(TensorRTUnavailableError, match=r"libnvinfer\.so\.10.*clipserve\[gpu\]"):
        load_tensorrt()


def test_load_tensorrt_returns_the_module(monkeypatch: pytest.MonkeyPatch):
    module = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    assert load_tensorrt() is module
