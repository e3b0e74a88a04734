"""One line instead of a traceback when a command needs an optional extra that this install lacks.

`make serve` installs only the serving extra (`cpu`); `clipserve export`, `train-demo` and `eval-demo` need torch,
open_clip and onnx from the `export` extra. Their imports happen inside the commands, so `--help` works anyway;
`needs_extras` turns a missing package into the install line and exit status 2 (a usage error, as typer's own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
