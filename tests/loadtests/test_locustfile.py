"""The Locust scenarios run against a real server: a short headless run with no failures."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import live_server

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"


def test_headless_locust_run_has_no_failures():
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    if not Path(locust).exists():
        pytest.skip("locust is not installed (dev extra)")
    with live_server() as (app, url):
        command = [locust, "-f", str(LOCUSTFILE), "--host", url, "--headless", "-u", "4", "-r", "4", "-t", "3s"]
        options = ["--only-summary", "--labels", "10", "--label-pool", "3", "ClassifyUser", "EmbedTextUser"]
        result = subprocess.run(
            [*command, *options],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]  # locust exits 1 when any request failed
        assert "/classify" in result.stdout + result.stderr
        assert app.state.metrics.value("clipserve_requests_total", {"route": "/classify", "status": "200"}) > 0
