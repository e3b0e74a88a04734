"""The one scoring recipe: cosines -> probabilities the way the model was trained, in numpy.

The service's CPU path, the export parity gate, the demo evaluation and the tests all score through this
module (the CUDA kernel in service/kernels is checked against it), so there is one definition of how a
model's logit scale, bias and activation turn similarities into probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scoring:
    """How the model turns cosines into probabilities (from the manifest)."""

    logit_scale: float
    logit_bias: float | None
    activation: str  # "softmax" | "sigmoid"

    def probabilities(self, cosines: np.ndarray, label_bias: np.ndarray | None = None) -> np.ndarray:
        """[N, C] cosines -> [N, C] probabilities, in float64 so the result does not depend on the label count.
        `label_bias` [C] is added to the logits per label (a classifier's few-shot correction, models.fewshot)."""
        logits = self.logit_scale * cosines.astype(np.float64)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if label_bias is not None:
            logits = logits + label_bias.astype(np.float64)
        if self.activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def cosines(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Both sides are L2-normalised, so the dot product is the cosine."""
    return images @ labels.T


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b`, in float64, for vectors that need not be normalised:
    how parity checks compare one runtime's embeddings with another's."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def ranked(probabilities: np.ndarray, top_k: int | None) -> np.ndarray:
    """Per row, column indices by descending probability (ties keep request order), cut to top_k."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    return order if top_k is None else order[:, :top_k]
