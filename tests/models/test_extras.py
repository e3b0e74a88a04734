"""Commands that need an optional extra print one install line and exit 2 when it is missing (issue 10, point 8).

The slim install (`make serve`) lacks torch, open_clip and onnx; here they are made unimportable the same way
(`sys.modules[name] = None`), and the real `clipserve` CLI runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from models.extras import needs_extras

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
