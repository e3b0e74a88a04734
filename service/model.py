"""The served model: which directory, its verified manifest, and the tokenizer and transform it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models import repository
from models.manifest import Manifest, load_manifest
from models.preprocess import ImageTransform
from models.scoring import Scoring
from models.tokenizer import ClipTokenizer
from service.settings import Settings


def model_directory(settings: Settings) -> Path:
    """The directory of the model `settings` name (models.repository.model_directory has the rules)."""
    return repository.model_directory(settings.model_repository, settings.model)


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
