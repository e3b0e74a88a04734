"""The one deadline of a request: made at the edge (the route) and passed down to every part that waits.

Every wait a request causes (the image and text batcher queues, the label cache's shared encodings, the
route's own `asyncio.timeout`) reads this one value, so a request has a single time budget however many
engine calls it makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic(), the clock asyncio's loop.time() uses too
    budget_s: float  # what the request was given, for messages

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining_s(self) -> float:
        return self.at - time.monotonic()
