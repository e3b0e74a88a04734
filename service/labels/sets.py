"""Whole label matrices of recently used label sets, in front of the per-label tiers.

A warm request for 1,000 labels used to rebuild its matrix label by label: a digest, a key, an LRU lookup and a
metric update per label, then a 2 MB `np.stack`, about 10 ms here, far more than the similarity it feeds (well
under 1 ms). Clients send the same label set again and again (a product's category list, an eval's classes), so
the matrix is kept whole, keyed by the templates and labels themselves: a hit costs hashing and comparing the
strings, tens of microseconds. A label's vector never changes within a namespace, so a kept matrix is never stale.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from cachetools import LRUCache

SetKey = tuple[tuple[str, ...], tuple[str, ...]]  # (templates, labels in request order)


class LabelSet(NamedTuple):
    matrix: np.ndarray  # [C, D] float32, read-only: every request with this set shares it
    distinct: int  # distinct labels, what the per-label tiers would have counted as lookups
    nbytes: int  # the matrix and its key's text


class LabelSets:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: LRUCache[SetKey, LabelSet] = LRUCache(maxsize=max(max_bytes, 1), getsizeof=lambda s: s.nbytes)

    def get(self, key: SetKey) -> LabelSet | None:
        return self._lru.get(key)

    def put(self, key: SetKey, matrix: np.ndarray, distinct: int) -> None:
        """Keeps `matrix` (made read-only by the caller: it is handed to every later request for the set)."""
        nbytes = matrix.nbytes + sum(map(len, key[0])) + sum(map(len, key[1]))
        if nbytes > self.max_bytes:
            return  # bigger than the whole tier (or the tier is off)
        self._lru[key] = LabelSet(matrix, distinct, nbytes)

    def clear(self) -> None:
        self._lru.clear()
