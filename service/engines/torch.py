"""PyTorch engine: the zoo's towers run eagerly, for models not (yet) exported or to check an export.

This is the only service module that imports torch, and the factory imports it only for
CLIPSERVE_ENGINE=torch, so the slim install never needs torch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from models import zoo
from models.manifest import Manifest
from service.engines.base import EngineError
from service.settings import Settings

log = logging.getLogger("clipserve.engines")

_INPUT_DTYPES = {"image": np.float32, "text": np.int64}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchEngine:
    """One zoo tower (pixels or token ids -> normalised embeddings) on one device, float32 weights."""

    def __init__(self, tower: torch.nn.Module, role: str, *, device: str, name: str = "") -> None:
        if role not in _INPUT_DTYPES:
            raise EngineError(f"unknown encoder role {role!r}")
        self.role = role
        self.max_batch_size: int | None = None
        self.precision = "fp32"
        self._device = torch.device(device)
        self._tower: torch.nn.Module | None = tower.eval().to(self._device)
        self._input_dtype = _INPUT_DTYPES[role]
        self.description = f"torch {torch.__version__} {self._device.type} fp32 {name or type(tower).__name__} {role}"

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        tower = self._tower
        if tower is None:
            raise EngineError(f"{self.description} is closed")
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=self._input_dtype)).to(self._device)
        with torch.inference_mode():
            output = tower(batch)
        return np.ascontiguousarray(output.float().cpu().numpy(), dtype=np.float32)

    def close(self) -> None:
        self._tower = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _load(manifest: Manifest, settings: Settings) -> zoo.LoadedModel:
    if settings.torch_model:
        log.info("torch engine: loading %s (CLIPSERVE_TORCH_MODEL)", settings.torch_model)
        return zoo.load_model(settings.torch_model)
    source = manifest.source
    match source.kind:
        case "demo":
            return zoo.load_demo()
        case "open_clip" if isinstance(source.architecture, str) and source.pretrained:
            # Downloads on first use (or reads open_clip's cache): the user chose a pretrained tag.
            log.info("torch engine: loading open_clip %s@%s", source.architecture, source.pretrained)
            return zoo.load_open_clip(source.architecture, source.pretrained)
    raise EngineError(
        f"the manifest of {manifest.name} does not say where to get its torch weights (source kind "
        f"{source.kind!r}); set CLIPSERVE_TORCH_MODEL to a models.zoo reference (e.g. open_clip:ARCH@FILE or hf:DIR)"
    )


def load_torch_engines(manifest: Manifest, settings: Settings) -> tuple[TorchEngine, TorchEngine]:
    """(image, text) engines from the weights the manifest's graphs were exported from."""
    try:
        loaded = _load(manifest, settings)
    except (OSError, ValueError, NotImplementedError) as error:  # missing files, bad reference, unsupported model
        raise EngineError(f"cannot load the torch weights for {manifest.name}: {error}") from error
    expected, actual = manifest.source.sha256, loaded.source.get("sha256")
    if expected and actual and expected != actual:
        raise EngineError(
            f"the weights differ from the ones the graphs were exported from: {loaded.name} has sha256 "
            f"{actual[:16]}…, the manifest of {manifest.name} records {expected[:16]}…"
        )
    if loaded.embed_dim != manifest.embed_dim:
        raise EngineError(
            f"{loaded.name} embeds into {loaded.embed_dim} dimensions, the manifest of {manifest.name} into "
            f"{manifest.embed_dim}: not the same model"
        )
    if settings.precision != "fp32":
        log.warning("CLIPSERVE_PRECISION=%s selects exported graphs; the torch engine runs fp32", settings.precision)
    device = default_device()
    return (
        TorchEngine(loaded.image_tower, "image", device=device, name=loaded.name),
        TorchEngine(loaded.text_tower, "text", device=device, name=loaded.name),
    )
