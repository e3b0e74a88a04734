"""Label vectors: the label cache and the small parts it is made of (memory tier, Redis tier with its backoff,
single-flight), each owning one job. `LabelCache` in cache.py puts them together."""
