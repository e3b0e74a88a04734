"""Turning a trained model into served artifacts: ONNX graphs (fp32, fp16, int8), TensorRT engines, a Triton
model repository, parity verification against the PyTorch original, and the manifest. Imports `models`
(torch allowed here); nothing imports `export`.
"""

from importlib import metadata

try:
    __version__ = metadata.version("clipserve")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
