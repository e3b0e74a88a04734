"""Build, save and load the demo model as an open_clip `CLIP` (torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file, save_file

from models.demo.config import ARTIFACTS_DIR, CARD_FILE, MODEL_CONFIG, WEIGHTS_FILE


def build_model(config: dict | None = None) -> open_clip.CLIP:
    return open_clip.CLIP(**(config or MODEL_CONFIG))


def save(model: torch.nn.Module, card: dict[str, Any], directory: Path = ARTIFACTS_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # fp16 on disk halves the size; weights are cast back to fp32 on load, where the model runs.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def read_card(directory: Path = ARTIFACTS_DIR) -> dict[str, Any]:
    return json.loads((directory / CARD_FILE).read_text())


def load(directory: Path = ARTIFACTS_DIR) -> open_clip.CLIP:
    card = read_card(directory)
    model = build_model(card["model_config"])
    state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
    model.load_state_dict(state)
    return model.eval()
