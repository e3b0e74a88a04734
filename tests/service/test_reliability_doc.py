"""docs/reliability.md stays true: it lists every error code the service can answer with, and its limits table
gives each setting's actual default."""

from __future__ import annotations

import re
from pathlib import Path

import service.admission  # noqa: F401  (registers Draining)
from service.errors import ServiceError
from service.settings import Settings

DOC = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
# Codes the exception handlers and middleware produce without a ServiceError class of their own.
HANDLER_CODES = {"invalid_request", "not_found", "method_not_allowed", "http_error", "internal_error"}


def _classes(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _classes(sub))]


def test_every_error_code_is_documented_with_its_status() -> None:
    documented = {code: int(status) for status, code in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", DOC, re.M)}
    for cls in _classes(ServiceError):
        assert documented.get(cls.code) == cls.status, f"{cls.code} ({cls.status}) is not in docs/reliability.md"
    for code in HANDLER_CODES - {"http_error"}:
        assert code in documented, f"{code} is missing from docs/reliability.md"
    assert "`http_error`" in DOC


def test_the_limits_table_gives_the_real_defaults() -> None:
    rows = re.findall(r"^\| `CLIPSERVE_([A-Z_]+)` \| ([^|]+) \|", DOC, re.M)
    assert len(rows) >= 15
    for name, default in rows:
        field = Settings.model_fields[name.lower()]
        value = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
        assert value == default.strip(), f"CLIPSERVE_{name}: the doc says {default.strip()}, the code {value}"
