"""Settings from the environment, as containers and Kubernetes pass them."""

from __future__ import annotations

import pytest

from service.settings import Settings


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch):
    # docker-compose.yml passes `CLIPSERVE_MODEL: ${CLIPSERVE_MODEL:-}` through when the user set nothing.
    for name in ("CLIPSERVE_MODEL", "CLIPSERVE_PORT", "CLIPSERVE_API_KEYS", "CLIPSERVE_REDIS_URL"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.model, settings.port, settings.api_keys, settings.redis_url) == (None, 8000, [], None)


def test_variables_set_the_fields(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CLIPSERVE_MODEL", "vit-b-32")
    monkeypatch.setenv("CLIPSERVE_API_KEYS", "one, two")
    monkeypatch.setenv("CLIPSERVE_MAX_BATCH_SIZE", "64")
    settings = Settings()
    assert (settings.model, settings.api_keys, settings.max_batch_size) == ("vit-b-32", ["one", "two"], 64)
