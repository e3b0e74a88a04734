"""The HTTP service: settings, app factory, routes, batching, engines, label cache, metrics and the CLI.

It imports `models` (manifest, preprocessing, tokenizer, templates) and nothing else of ours, and never
imports torch: the serving install is onnxruntime + numpy + Pillow + tokenizers.
"""
