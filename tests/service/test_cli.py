"""The `clipserve` command: built-in and plugin subcommands are all there."""

import shutil
import signal
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


def test_invalid_settings_stop_serve_with_one_line_per_variable(app, monkeypatch):
    monkeypatch.setenv("CLIPSERVE_DEFAULT_TEMPLATES", "bogus")
    monkeypatch.setenv("CLIPSERVE_PORT", "99999")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "CLIPSERVE_DEFAULT_TEMPLATES='bogus'" in result.output and "unknown template preset" in result.output
    assert "CLIPSERVE_PORT='99999'" in result.output
    assert "Traceback" not in result.output


def test_port_zero_listens_on_a_free_port(tmp_path):
    # --port 0 used to fall back to CLIPSERVE_PORT (`port or settings.port`); it must reach uvicorn as 0.
    command = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:  # uvicorn logs where it listens once started
            lines.append(line)
            if "Uvicorn running on" in line or len(lines) > 200:
                break
        running = next((line for line in lines if "Uvicorn running on" in line), "")
        assert "http://127.0.0.1:" in running, "".join(lines)
        port = int(running.split("http://127.0.0.1:")[1].split()[0])
        assert port not in (0, 8000)
    finally:
        server.send_signal(signal.SIGINT)  # SIGTERM would drain for 5 s first
        server.wait(timeout=30)
