"""The `CLIPSERVE_*` variables that the service and the export commands both read, each defined once.

`service.settings.Settings` extends `SharedSettings` with everything only the service reads; `clipserve export` and
`clipserve build-engines` (the GPU image's entrypoint) read `SharedSettings` itself, since export may not import
the service. So a variable has one name, one default and one validation wherever it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import typer
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

AnySettings = TypeVar("AnySettings", bound=BaseSettings)


class SharedSettings(BaseSettings):
    # An empty variable means unset: compose files and Kubernetes manifests pass `CLIPSERVE_MODEL=` through
    # when the user set nothing, and that must select the default, not a model named "".
    model_config = SettingsConfigDict(env_prefix="CLIPSERVE_", extra="ignore", frozen=True, env_ignore_empty=True)

    model_repository: Path | None = Field(
        None, description="Folder of exported models (clipserve export); unset: the built-in demo repository."
    )
    model: str | None = Field(None, description="Model name in the repository; unset: the built-in demo model.")
    tensorrt_precision: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16",
        description="Precision of the TensorRT plans `clipserve build-engines` (the gpu image's entrypoint) builds.",
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images per image-engine call.")


def read_settings(settings_class: type[AnySettings], command: str) -> AnySettings:
    """`settings_class()` from the environment, or `clipserve <command>` stops with one line per invalid variable
    (`  CLIPSERVE_PORT='99999': ...`) and exit status 2, a usage error as typer's own, instead of a traceback."""
    try:
        return settings_class()
    except ValidationError as error:
        problems = [
            f"  CLIPSERVE_{'.'.join(map(str, problem['loc'])).upper()}={problem.get('input')!r}: {problem['msg']}"
            for problem in error.errors()
        ]
        typer.echo(f"clipserve {command}: invalid settings:\n" + "\n".join(problems), err=True)
        raise typer.Exit(2) from None
