"""Prompts -> L2-normalised text embeddings: the tokenizer in a worker thread, then the batched text engine.

Built once by the pipeline and handed to whoever needs text vectors (the label cache, /embed, the OpenAI
embeddings route), so nothing has to call back into the pipeline for them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import numpy as np

from models.tokenizer import ClipTokenizer
from service.batcher import DynamicBatcher
from service.deadline import Deadline


class TextEncoder:
    def __init__(self, tokenizer: ClipTokenizer, batcher: DynamicBatcher, pool: Executor) -> None:
        self.tokenizer, self._batcher, self._pool = tokenizer, batcher, pool

    async def __call__(self, prompts: list[str], deadline: Deadline) -> np.ndarray:
        """[len(prompts), D] float32; raises what the batcher raises (deadline, overload)."""
        ids = await asyncio.get_running_loop().run_in_executor(self._pool, self.tokenizer, prompts)
        return await self._batcher.submit(ids, deadline=deadline.at)

    async def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts`, start and end markers included (the OpenAI `usage` field)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: sum(len(self.tokenizer.encode(text)) + 2 for text in texts)
        )
