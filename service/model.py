"""The served model: which directory, its verified manifest, and the tokenizer and transform it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import MANIFEST_FILE, Manifest, load_manifest
from models.preprocess import ImageTransform
from models.tokenizer import ClipTokenizer
from service.settings import Settings
from service.similarity import Scoring


class ModelNotFoundError(FileNotFoundError):
    """The configured repository has no (or no unambiguous) model to serve."""


def available_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILE).is_file()) if repository.is_dir() else []


def model_directory(settings: Settings) -> Path:
    """CLIPSERVE_MODEL_REPOSITORY / CLIPSERVE_MODEL, defaulting to the built-in demo repository and model.

    With a repository but no model name, a repository holding exactly one model serves that one.
    """
    repository = Path(settings.model_repository or REPOSITORY_DIR)
    name = settings.model
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


@dataclass(frozen=True)
class ServedModel:
    directory: Path
    manifest: Manifest
    tokenizer: ClipTokenizer
    transform: ImageTransform
    scoring: Scoring
    content_hash: str

    @classmethod
    def load(cls, settings: Settings) -> ServedModel:
        directory = model_directory(settings)
        manifest = load_manifest(directory, verify=True)  # refuses a corrupted or partly copied model
        return cls(
            directory=directory,
            manifest=manifest,
            tokenizer=ClipTokenizer.from_file(directory / manifest.tokenizer.file, manifest.tokenizer.spec()),
            transform=ImageTransform(manifest.preprocess.config()),
            scoring=Scoring(manifest.logit_scale, manifest.logit_bias, manifest.activation),
            content_hash=manifest.content_hash(),
        )

    @property
    def name(self) -> str:
        return self.manifest.name
