"""Tests mirror the packages (tests/models, tests/service, later tests/export). Real parts only: real
tokenizers, real Pillow transforms, real open_clip / transformers models at tiny random-init sizes, the
committed demo weights; nothing is downloaded and nothing is retrained. Heavy tests are marked `slow`.
"""
