"""The in-process tier of the label cache: an LRU of label vectors bounded in bytes (cachetools)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from cachetools import LRUCache


def frozen(vector: np.ndarray) -> np.ndarray:
    """float32, contiguous and read-only: a cached vector is shared by every caller, so none may change it."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    vector.flags.writeable = False
    return vector


class _Entry(NamedTuple):
    vector: np.ndarray
    nbytes: int  # the vector and its key: keys are about as long as a small model's vector


class MemoryTier:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: LRUCache[str, _Entry] = LRUCache(maxsize=max(max_bytes, 1), getsizeof=lambda e: e.nbytes)

    def get(self, key: str) -> np.ndarray | None:
        entry = self._lru.get(key)  # a hit makes the key the most recently used
        return None if entry is None else entry.vector

    def put(self, key: str, vector: np.ndarray) -> None:
        size = vector.nbytes + len(key)
        if size > self.max_bytes or key in self._lru:
            return  # too big for the whole tier (or the tier is off), or already there
        self._lru[key] = _Entry(vector, size)  # evicts the least recently used entries until it fits
