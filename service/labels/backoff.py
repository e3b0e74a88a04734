"""A backoff for an optional dependency: after a failure, leave it alone for a while that doubles with each
failure in a row (up to a cap), and go back to it at once after a success.

Used by the Redis tier's breaker as the shortest time Redis is left alone after it failed, before the probe
may let it back in: a Redis that answers PING but keeps failing real calls then costs a timeout less and less
often. The clock is injectable: tests move time by hand instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    def __init__(
        self, initial_s: float = 0.5, max_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s, self.max_s, self.clock = initial_s, max_s, clock
        self._until = 0.0  # clock() before which the dependency is not tried
        self._next_s = initial_s

    @property
    def open(self) -> bool:
        """Whether the dependency may be tried now."""
        return self.clock() >= self._until

    def failed(self) -> float:
        """Records a failure; returns how long the dependency is now left alone, in seconds."""
        wait_s = self._next_s
        self._until = self.clock() + wait_s
        self._next_s = min(wait_s * 2, self.max_s)
        return wait_s

    def succeeded(self) -> None:
        self._next_s = self.initial_s
