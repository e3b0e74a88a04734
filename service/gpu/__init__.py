"""The GPU path: device-resident embeddings, the CUDA similarity kernel and GPU preprocessing.

Nothing here imports torch or CUDA at module import; each piece loads its runtime when first used, so the
CPU install imports the service unchanged.
"""
