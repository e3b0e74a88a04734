"""The served model: which directory, its verified manifest, and the tokenizer and transform it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import Manifest, load_manifest
from models.preprocess import ImageTransform
from models.tokenizer import ClipTokenizer
from service.settings import Settings
from service.similarity import Scoring


def model_directory(settings: Settings) -> Path:
    """CLIPSERVE_MODEL_REPOSITORY / CLIPSERVE_MODEL, defaulting to the built-in demo repository and model."""
    repository = settings.model_repository or REPOSITORY_DIR
    return Path(repository) / (settings.model or EXPORT_NAME)


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
