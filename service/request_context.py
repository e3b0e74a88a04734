"""The request a task is serving: its id and the engine batches it rode in.

Bound by `service.request_log.RequestLogMiddleware` at the start of each request. Error bodies read the id and the
batchers add batch sizes from inside the request's own task, so neither needs the request passed down to it.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field


@dataclass
class ServedRequest:
    id: str
    batch_sizes: dict[str, int] = field(default_factory=dict)  # batcher name -> largest engine batch


_current: ContextVar[ServedRequest | None] = ContextVar("clipserve_request", default=None)


def current_id() -> str | None:
    """The id of the request being served by this task, or None outside a request."""
    request = _current.get()
    return request.id if request is not None else None


def note_batch(batcher: str, rows: int) -> None:
    """Records that this request's work ran in an engine batch of `rows` rows."""
    request = _current.get()
    if request is not None:
        request.batch_sizes[batcher] = max(rows, request.batch_sizes.get(batcher, 0))


def bind(request: ServedRequest) -> Token[ServedRequest | None]:
    return _current.set(request)
