"""The engine protocol every runtime implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class EngineError(RuntimeError):
    """An engine cannot be built for this machine or model (missing runtime, GPU mismatch, bad artifact)."""


class Engine(Protocol):
    """One encoder: a blocking call from a batch of inputs to L2-normalised float32 embeddings [B, D].

    Image engines take float32 pixels [B, 3, S, S]; text engines take int64 token ids [B, L]. Calls come from
    one worker thread at a time (the batcher), never from the event loop.
    """

    role: str  # "image" | "text"
    description: str  # for logs, /v1/models and the engine-info metric, e.g. "onnxruntime CPU fp32 image.onnx"
    max_batch_size: int | None  # the runtime's own limit (a TensorRT profile's max), None when unbounded
    precision: str  # what it computes in ("fp32", "fp16", ...): part of the label cache's key

    def __call__(self, inputs: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
