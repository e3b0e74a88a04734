"""Optional extras: one line instead of a traceback when a command needs one that this install lacks.

`make serve` installs only the serving extra (`cpu`); `clipserve export`, `train-demo` and `eval-demo` need torch,
open_clip and onnx from the `export` extra. Their imports happen inside the commands, so `--help` works anyway;
`needs_extras` turns a missing package into the install line and exit status 2 (a usage error, as typer's own).
TensorRT (the `gpu` extra) is imported through `load_tensorrt`, by both the engine builder and the service.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., Any])

# Top-level modules that only optional extras bring, and the extra each comes from.
EXTRA_OF_MODULE = {
    "torch": "export",
    "torchvision": "export",
    "open_clip": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnx_ir": "export",
    "transformers": "export",
    "safetensors": "export",
    "tqdm": "export",
    "onnxruntime": "cpu",
    "tensorrt": "gpu",
    "openvino": "openvino",
}


def needs_extras(command_name: str, *extras: str) -> Callable[[Command], Command]:
    """Wrap a typer command that needs `extras` installed."""
    install = f"pip install 'clipserve[{','.join(extras)}]'"

    def decorate(command: Command) -> Command:
        @functools.wraps(command)  # typer reads the options from the wrapped signature
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except ModuleNotFoundError as error:
                missing = (error.name or "").split(".")[0]
                if missing not in EXTRA_OF_MODULE:
                    raise
                typer.echo(
                    f"clipserve {command_name}: needs {missing}, which is not installed: {install} "
                    "(the environment `make test` builds has it)",
                    err=True,
                )
                raise typer.Exit(2) from None

        return run  # type: ignore[return-value]

    return decorate


class TensorRTUnavailableError(RuntimeError):
    """The `tensorrt` package cannot be imported on this machine."""


def load_tensorrt() -> ModuleType:
    """The `tensorrt` module, imported only when asked for, or a TensorRTUnavailableError saying how to get it."""
    try:
        import tensorrt
    # The wheel imports, then dlopens libnvinfer; a broken CUDA install shows up as OSError, not ImportError.
    except (ImportError, OSError) as error:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed here (import tensorrt failed: {error}). TensorRT engines need an NVIDIA GPU "
            "and `pip install 'clipserve[gpu]'` (tensorrt>=10); the ONNX formats (onnx, onnx-fp16, onnx-int8) work "
            "without it."
        ) from error
    return tensorrt
