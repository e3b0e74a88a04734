"""The saved classifiers of this replica: their definitions (through the store), and their label matrices,
prepared in the background on the text batcher's background lane.

Preparation goes through the label cache slice by slice (a slice is one label-cache chunk of labels), so every
finished slice is cached as it goes: in Redis when configured, else as files in the state directory. A restart,
or another replica, continues where it stopped. Live requests keep the text engine first: background prompts run
only when no live prompt waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from service.classifiers.store import NAME_PATTERN, Definition, DefinitionStore, SliceFiles
from service.deadline import Deadline
from service.errors import ClassifierFailed, ClassifierNotFound, ClassifierNotReady
from service.labels.cache import LabelCache
from service.metrics import Metrics

log = logging.getLogger("clipserve.classifiers")

# Nobody waits for a background preparation; the deadline only has to outlast it.
_PREPARATION_BUDGET_S = 7 * 24 * 3600.0


@dataclass(eq=False)
class Classifier:
    definition: Definition
    status: str = "preparing"  # preparing | ready | failed
    prompts_prepared: int = 0
    started: float = field(default_factory=time.monotonic)
    encoded_prompts: int = 0  # of prompts_prepared, those this replica encoded (not found cached): for the ETA
    error: str | None = None
    matrix: np.ndarray | None = None
    task: asyncio.Task[None] | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate this replica has been encoding, once it has encoded something."""
        if self.status != "preparing" or not self.encoded_prompts:
            return None
        rate = self.encoded_prompts / max(time.monotonic() - self.started, 1e-6)
        return (self.definition.prompts - self.prompts_prepared) / rate


class Classifiers:
    def __init__(
        self,
        store: DefinitionStore,
        label_cache: LabelCache,
        metrics: Metrics,
        *,
        slice_files: SliceFiles | None = None,
    ) -> None:
        self.store, self.label_cache, self.metrics, self.slice_files = store, label_cache, metrics, slice_files
        self._loaded: dict[str, Classifier] = {}

    async def start(self) -> None:
        """Prepares every stored definition for the served model (cached slices make this quick)."""
        for name in await self.store.names():
            definition = await self.store.load(name)
            if definition is not None:
                await self._adopt(definition)

    async def close(self) -> None:
        tasks = [c.task for c in self._loaded.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    async def put(self, definition: Definition) -> tuple[Classifier, bool]:
        """Creates or replaces; returns the classifier and whether it already existed with the same content."""
        existing = await self.get(definition.name, missing_ok=True)
        if existing is not None and existing.definition.digest == definition.digest and existing.status != "failed":
            return existing, True
        await self.store.save(definition)
        return await self._adopt(definition), False

    async def get(self, name: str, *, missing_ok: bool = False) -> Classifier | None:
        classifier = None
        if NAME_PATTERN.fullmatch(name):
            classifier = self._loaded.get(name)
            # The store is the truth: another replica (Redis) may have defined, replaced or deleted it.
            digest = await self.store.digest(name)
            if digest is None and classifier is not None:
                self._forget(self._loaded.pop(name))
                classifier = None
            elif digest is not None and (classifier is None or classifier.definition.digest != digest):
                definition = await self.store.load(name)
                classifier = None if definition is None else await self._adopt(definition)
        if classifier is None and not missing_ok:
            raise ClassifierNotFound(f"no classifier named {name!r}; create it with PUT /v1/classifiers/{name}")
        return classifier

    async def names(self) -> list[str]:
        return sorted(set(await self.store.names()) | set(self._loaded))

    async def delete(self, name: str) -> bool:
        if not NAME_PATTERN.fullmatch(name):
            return False  # no such name was ever accepted
        existed = await self.store.delete(name)
        classifier = self._loaded.pop(name, None)
        if classifier is not None:
            self._forget(classifier)
        if self.slice_files is not None:
            self.slice_files.delete(name)
        return existed or classifier is not None

    async def ready(self, name: str) -> Classifier:
        """The classifier with its label matrix, for /classify; 404 if unknown, 409 while it is being prepared."""
        classifier = await self.get(name)
        assert classifier is not None
        if classifier.status == "failed":
            raise ClassifierFailed(
                f"classifier {name!r} could not be prepared: {classifier.error}; PUT it again to retry",
                param="classifier",
            )
        if classifier.matrix is None:
            eta = f", about {classifier.eta_s:.0f} s left" if classifier.eta_s is not None else ""
            raise ClassifierNotReady(
                f"classifier {name!r} is being prepared: {classifier.prompts_prepared:,} of "
                f"{classifier.definition.prompts:,} prompts{eta}",
                param="classifier",
                headers={"Retry-After": str(max(1, round(classifier.eta_s or 1)))},
            )
        return classifier

    # --- preparation ---------------------------------------------------------------------------------------------

    async def _adopt(self, definition: Definition) -> Classifier:
        old = self._loaded.pop(definition.name, None)
        if old is not None:
            self._forget(old)
        classifier = Classifier(definition)
        self._loaded[definition.name] = classifier
        self._set_progress(classifier)
        matrix = await self._cached(definition)
        if matrix is not None:
            self._finish(classifier, matrix)
        else:
            classifier.task = asyncio.create_task(self._prepare(classifier), name=f"prepare-{definition.name}")
        return classifier

    def _slices(self, definition: Definition) -> list[tuple[int, int]]:
        step = max(1, self.label_cache.chunk_prompts // len(definition.templates))
        return [(start, min(start + step, len(definition.labels))) for start in range(0, len(definition.labels), step)]

    async def _cached(self, definition: Definition) -> np.ndarray | None:
        if self.slice_files is not None:
            parts = [self.slice_files.load(definition, a, b - a) for a, b in self._slices(definition)]
            if all(part is not None for part in parts):
                return np.concatenate(parts) if parts else None  # type: ignore[arg-type]
        return await self.label_cache.cached_matrix(definition.labels, definition.templates)

    async def _prepare(self, classifier: Classifier) -> None:
        definition = classifier.definition
        deadline = Deadline.after(_PREPARATION_BUDGET_S)
        parts: list[np.ndarray] = []
        try:
            for start, stop in self._slices(definition):
                part = self.slice_files.load(definition, start, stop - start) if self.slice_files else None
                if part is None:
                    labels = definition.labels[start:stop]
                    cached = await self.label_cache.cached_matrix(labels, definition.templates)
                    if cached is None:
                        part = await self.label_cache.label_matrix(
                            labels, definition.templates, deadline, background=True
                        )
                        classifier.encoded_prompts += len(labels) * len(definition.templates)
                    else:
                        part = cached
                    if self.slice_files is not None:
                        await asyncio.to_thread(self.slice_files.save, definition, start, part)
                parts.append(part)
                classifier.prompts_prepared = stop * len(definition.templates)
                self._set_progress(classifier)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the text engine failed: say so on GET and /classify, and in the log
            log.exception("preparing classifier %s failed", definition.name)
            classifier.status, classifier.error = "failed", f"{type(error).__name__}: {error}"
            return
        self._finish(classifier, np.concatenate(parts))
        log.info(
            "classifier %s ready: %d labels x %d templates",
            definition.name,
            len(definition.labels),
            len(definition.templates),
        )

    def _finish(self, classifier: Classifier, matrix: np.ndarray) -> None:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        matrix.flags.writeable = False
        classifier.matrix, classifier.status = matrix, "ready"
        classifier.prompts_prepared = classifier.definition.prompts
        self._set_progress(classifier)

    def _forget(self, classifier: Classifier) -> None:
        if classifier.task is not None:
            classifier.task.cancel()
        for kind in ("prepared", "total"):
            with contextlib.suppress(KeyError):  # never set
                self.metrics.classifier_prompts.remove(classifier.definition.name, kind)

    def _set_progress(self, classifier: Classifier) -> None:
        name = classifier.definition.name
        self.metrics.classifier_prompts.labels(name, "prepared").set(classifier.prompts_prepared)
        self.metrics.classifier_prompts.labels(name, "total").set(classifier.definition.prompts)
