"""`requires_gpu`: the marks of a test that needs a CUDA GPU.

Such tests are marked `gpu` and skipped, with this reason, on machines without one (CI, a laptop); `make
gpu-check` runs them on a GPU machine. torch is the probe because every GPU test drives the device through it.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


requires_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA GPU and torch with CUDA; none here (make gpu-check runs it)"
    ),
]
