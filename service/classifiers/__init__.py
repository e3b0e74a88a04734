"""Saved classifiers: named label sets whose vectors are prepared once, in the background, and then used by name
(`POST /classify` with `"classifier"`). `registry.py` owns them; `store.py` keeps their definitions."""
