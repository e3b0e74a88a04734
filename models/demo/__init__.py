"""The built-in demo model: a tiny open_clip CLIP trained here from scratch on synthetic coloured shapes,
so that a fresh install classifies real images offline. `shapes` renders captioned images, `train` runs
the paper's contrastive pre-training, `evaluate` measures zero-shot accuracy, `artifacts/` holds the result.
"""
