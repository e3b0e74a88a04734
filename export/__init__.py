"""Turning a trained model into served artifacts: ONNX graphs, TensorRT engines, a Triton model repository,
parity verification against the PyTorch original, and the manifest. Imports `models` (torch allowed here);
nothing imports `export`. (Filled in by the export issue.)
"""
