"""The built-in demo model's architecture and training recipe (plain data, no torch)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
WEIGHTS_FILE = "weights.safetensors"  # fp16 state dict
CARD_FILE = "model.json"  # config, preprocessing, recipe and training record
# The exported demo model, committed so that the slim install serves it with no torch and no export step.
# fp16 graphs are left out: they only pay off on GPUs and would take the demo past its 40 MB budget.
REPOSITORY_DIR = Path(__file__).parent / "repository"
EXPORT_NAME = "clipserve-demo"
EXPORT_FORMATS = ("onnx", "onnx-int8")

IMAGE_SIZE = 64
CONTEXT_LENGTH = 32  # captions and the 80 ImageNet templates all fit in 32 tokens

# An open_clip CLIP, so export and serving treat it like any pretrained model. The image tower is the
# paper's attention-pooled ResNet (open_clip ModifiedResNet); width 16 keeps it fast on two CPU cores and
# small on disk. The text tower keeps CLIP's full 49,408-token vocabulary, at width 48.
MODEL_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [2, 2, 2, 2], "width": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}

# Preprocessing of the paper's models (resize shortest side bicubic, centre crop, OpenAI mean/std).
PREPROCESS: dict = {"image_size": IMAGE_SIZE, "interpolation": "bicubic", "resize_mode": "shortest"}
