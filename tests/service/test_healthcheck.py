"""`python -m service.healthcheck`, the Docker image's HEALTHCHECK, against a real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.healthcheck import check
from tests.service.conftest import free_port, live_server


def test_healthy_server_passes_even_with_a_proxy_configured(monkeypatch: pytest.MonkeyPatch):
    with live_server() as (_, url):
        port = url.rsplit(":", 1)[1]
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there: a proxied check would fail
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        assert check(port) is None
        result = subprocess.run(
            [sys.executable, "-m", "service.healthcheck"],
            env={"CLIPSERVE_PORT": port, "HTTP_PROXY": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr


def test_nothing_listening_is_unhealthy_with_the_reason():
    problem = check(str(free_port()), timeout_s=1)
    assert problem is not None and "refused" in problem.lower()
