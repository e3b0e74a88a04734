"""Tiny random-init model configs shared by the zoo and export tests (nothing is downloaded)."""

from __future__ import annotations

from typing import Any


def tiny_hf_clip_config() -> Any:
    """A transformers CLIPConfig small enough to build and export in seconds, with CLIP's real vocabulary."""
    import transformers

    return transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=24,
    )
