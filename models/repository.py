"""A model repository: one folder per model written by `clipserve export`, and which of them to serve.

The service and `clipserve build-engines` (the GPU image's entrypoint) both resolve the model this way, from
CLIPSERVE_MODEL_REPOSITORY and CLIPSERVE_MODEL, so they always agree on the directory.
"""

from __future__ import annotations

from pathlib import Path

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import MANIFEST_FILE


class ModelNotFoundError(FileNotFoundError):
    """The repository has no (or no unambiguous) model to serve."""


def available_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILE).is_file()) if repository.is_dir() else []


def model_directory(repository: Path | None, name: str | None) -> Path:
    """`repository / name`, defaulting to the built-in demo repository and model.

    With a repository but no model name, a repository holding exactly one model serves that one.
    """
    repository = Path(repository or REPOSITORY_DIR)
    if name is None:
        found = available_models(repository)
        name = found[0] if len(found) == 1 else EXPORT_NAME
    directory = repository / name
    if not (directory / MANIFEST_FILE).is_file():
        found = available_models(repository)
        raise ModelNotFoundError(
            f"no exported model {name!r} in {repository} (models there: {', '.join(found) or 'none'}); "
            "set CLIPSERVE_MODEL, or export one with `clipserve export`"
        )
    return directory
