"""The `clipserve` command: built-in and plugin subcommands are all there."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service import cli


@pytest.fixture(scope="module")
def app():
    cli._register_plugins()
    return cli.app


def test_help_lists_serve_and_the_demo_model_commands(app):
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("serve", "train-demo", "eval-demo"):
        assert command in result.output


def test_train_demo_help_shows_the_reproducible_defaults(app):
    result = CliRunner().invoke(app, ["train-demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "--seed" in result.output and "--steps" in result.output


def test_installed_console_script_runs():
    script = Path(sys.executable).with_name("clipserve")
    executable = str(script) if script.exists() else shutil.which("clipserve")
    if executable is None:
        pytest.skip("the clipserve console script is not installed (pip install -e .)")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train-demo" in result.stdout
