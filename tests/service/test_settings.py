"""Settings from the environment, as containers and Kubernetes pass them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from models.settings import SharedSettings
from models.templates import SERVING_PRESET
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


def test_variables_the_export_commands_read_too_are_defined_once_in_the_shared_model(monkeypatch: pytest.MonkeyPatch):
    shared = set(SharedSettings.model_fields)
    assert shared == {"model_repository", "model", "tensorrt_precision", "max_batch_size"}
    assert issubclass(Settings, SharedSettings) and not shared & set(vars(Settings).get("__annotations__", {}))
    monkeypatch.setenv("CLIPSERVE_MODEL_REPOSITORY", "/models")
    monkeypatch.setenv("CLIPSERVE_MAX_BATCH_SIZE", "16")
    for settings in (Settings(), SharedSettings()):
        assert (settings.model_repository, settings.max_batch_size) == (Path("/models"), 16)


def test_invalid_shared_variables_fail_both_models_alike(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CLIPSERVE_TENSORRT_PRECISION", "int8")
    for model in (Settings, SharedSettings):
        with pytest.raises(ValidationError, match="tensorrt_precision"):
            model()


def test_requests_without_templates_get_the_serving_preset():
    assert Settings().default_templates == SERVING_PRESET == "simple"
