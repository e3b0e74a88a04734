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
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.fewshot import DEFAULT_WEIGHT, Prototypes, label_bias, prototypes
from service.classifiers.store import NAME_PATTERN, Definition, DefinitionStore, SliceFiles
from service.deadline import Deadline
from service.errors import (
    ClassifierFailed,
    ClassifierNotFound,
    ClassifierNotReady,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    StoreUnavailable,
)
from service.image_encoder import ImageEncoder
from service.images import ImageInput
from service.labels.cache import LabelCache
from service.metrics import Metrics

log = logging.getLogger("clipserve.classifiers")

# Nobody waits for a background preparation; the deadline only has to outlast it.
_PREPARATION_BUDGET_S = 7 * 24 * 3600.0


def _remapped(old: Definition, new: Definition) -> tuple[tuple[int, str], ...]:
    """`old`'s examples on `new`'s label rows: the same row where the label there is unchanged, else the first row
    with that label (labels may repeat: ImageNet's list has "missile" and "sunglasses" twice); dropped if gone."""
    first: dict[str, int] = {}
    for i, label in enumerate(new.labels):
        first.setdefault(label, i)
    kept = []
    for i, sha in old.examples:
        label = old.labels[i]
        if i < len(new.labels) and new.labels[i] == label:
            kept.append((i, sha))
        elif label in first:
            kept.append((first[label], sha))
    return tuple(kept)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(eq=False)
class Classifier:
    definition: Definition
    stored_digest: str = ""  # the store's digest string when this was adopted: what get() compares against
    status: str = "preparing"  # preparing | ready | failed
    prompts_prepared: int = 0
    started: float = field(default_factory=time.monotonic)
    encoded_prompts: int = 0  # of prompts_prepared, those this replica encoded (not found cached): for the ETA
    error: str | None = None
    matrix: np.ndarray | None = None  # the zero-shot label vectors, [C, D]
    embedded: dict[str, np.ndarray] = field(default_factory=dict)  # example image sha -> its embedding
    task: asyncio.Task[None] | None = None
    _blends: dict[float, Prototypes] = field(default_factory=dict)
    _bias: np.ndarray | None = None  # models.fewshot.label_bias of these examples, at weight 1

    async def prototypes_for(self, weight: float | None, logit_scale: float) -> Prototypes:
        """What /classify scores against: the zero-shot vectors with the examples blended in and their per-label
        bias (models.fewshot.prototypes; `weight` None is its default, 0 is zero-shot). Computed off the event loop,
        the bias once per definition, and each weight's result kept for the next request."""
        assert self.matrix is not None
        weight = DEFAULT_WEIGHT if weight is None else weight
        if not self.definition.examples or weight == 0:
            return Prototypes(self.matrix, None)
        found = self._blends.get(weight)
        if found is None:
            found = await asyncio.to_thread(self._prototypes, weight, logit_scale)
            if len(self._blends) >= 8:  # a few per-request weights at most; the default is the common one
                self._blends.clear()
            self._blends[weight] = found
        return found

    def _prototypes(self, weight: float, logit_scale: float) -> Prototypes:
        assert self.matrix is not None
        labels = np.array([index for index, _ in self.definition.examples])
        embeddings = np.stack([self.embedded[sha] for _, sha in self.definition.examples])
        if self._bias is None:  # the fit does not depend on the weight: once per definition
            self._bias = label_bias(self.matrix, embeddings, labels, logit_scale)
        found = prototypes(self.matrix, embeddings, labels, logit_scale, weight, bias=self._bias)
        found.matrix.flags.writeable = False
        return found

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
        encode_images: ImageEncoder,
        slice_files: SliceFiles | None = None,
        max_examples_per_label: int = 16,
        max_example_bytes: int = 4 << 20,
    ) -> None:
        self.store, self.label_cache, self.metrics, self.slice_files = store, label_cache, metrics, slice_files
        self.encode_images = encode_images
        self.max_examples_per_label, self.max_example_bytes = max_examples_per_label, max_example_bytes
        self._loaded: dict[str, Classifier] = {}
        # One change at a time per classifier on this replica: each is read, await, write.
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def start(self) -> None:
        """Prepares every stored definition for the served model (cached slices make this quick)."""
        for name in await self.store.names():
            try:
                definition = await self.store.load(name)
                if definition is not None:
                    await self._adopt(definition)
            except StoreUnavailable:
                raise
            except Exception:  # one unreadable definition must not stop the service
                log.exception("saved classifier %s could not be loaded; skipped", name)

    async def close(self) -> None:
        tasks = [c.task for c in self._loaded.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    async def put(self, definition: Definition) -> tuple[Classifier, bool]:
        """Creates or replaces; returns the classifier and whether it already existed with the same labels and
        templates (then nothing changes, examples included). A replacement keeps the examples of the labels it
        still has."""
        async with self._lock(definition.name):
            existing = await self.get(definition.name, missing_ok=True)
            same = existing is not None and existing.definition.text_digest == definition.text_digest
            if same and existing is not None and existing.status != "failed":
                return existing, True
            if existing is not None:
                definition = definition.model_copy(update={"examples": _remapped(existing.definition, definition)})
            await self.store.save(definition)
            if existing is not None:  # images of labels the replacement dropped, slices of the old labels
                await self._delete_unreferenced(existing.definition, definition)
                if self.slice_files is not None and existing.definition.text_digest != definition.text_digest:
                    self.slice_files.forget(existing.definition)
            return await self._adopt(definition, previous=existing), False

    async def add_examples(self, name: str, label: str, images: Sequence[ImageInput], deadline: Deadline) -> Classifier:
        """Embeds the images (refusing any that do not decode), stores them and adds them to the label."""
        async with self._lock(name):
            return await self._add_examples(name, label, images, deadline)

    async def _add_examples(
        self, name: str, label: str, images: Sequence[ImageInput], deadline: Deadline
    ) -> Classifier:
        classifier = await self.get(name)
        assert classifier is not None
        definition = classifier.definition
        if label not in definition.labels:
            raise InvalidInput(f"{label!r} is not one of classifier {name!r}'s labels", param="label")
        index = definition.labels.index(label)
        files = await asyncio.to_thread(lambda: [image.decoded() for image in images])  # base64: off the loop
        for image, data in zip(images, files, strict=True):
            if len(data) > self.max_example_bytes:
                raise PayloadTooLarge(
                    f"{image.param} is {len(data):,} bytes; an example may have {self.max_example_bytes:,}",
                    param=image.param,
                )
        present = {sha for _, sha in definition.examples}
        new = {_sha(data): (image.param, data) for image, data in zip(images, files, strict=True)}
        new = {sha: item for sha, item in new.items() if sha not in present}  # the same image twice counts once
        count = sum(1 for i, _ in definition.examples if i == index) + len(new)
        if count > self.max_examples_per_label:
            raise InvalidInput(
                f"{label!r} would have {count} examples; the limit is {self.max_examples_per_label} per label "
                "(CLIPSERVE_MAX_EXAMPLES_PER_LABEL)",
                param="images",
            )
        if not new:
            return classifier
        embeddings = await self.encode_images([ImageInput(data, param) for param, data in new.values()], deadline)
        for sha, (_, data) in new.items():
            await self.store.save_image(name, sha, data)
        updated = definition.model_copy(update={"examples": (*definition.examples, *((index, sha) for sha in new))})
        await self.store.save(updated)
        return await self._adopt(updated, previous=classifier, embedded=dict(zip(new, embeddings, strict=True)))

    async def remove_examples(self, name: str, label: str | None) -> Classifier:
        """Removes the examples of `label`, or all of them."""
        async with self._lock(name):
            return await self._remove_examples(name, label)

    async def _remove_examples(self, name: str, label: str | None) -> Classifier:
        classifier = await self.get(name)
        assert classifier is not None
        definition = classifier.definition
        if label is not None and label not in definition.labels:
            raise InvalidInput(f"{label!r} is not one of classifier {name!r}'s labels", param="label")
        drop = None if label is None else definition.labels.index(label)
        kept = tuple((i, sha) for i, sha in definition.examples if drop is not None and i != drop)
        updated = definition.model_copy(update={"examples": kept})
        await self.store.save(updated)
        await self._delete_unreferenced(definition, updated)
        return await self._adopt(updated, previous=classifier)

    async def _delete_unreferenced(self, old: Definition, new: Definition) -> None:
        for sha in {sha for _, sha in old.examples} - {sha for _, sha in new.examples}:
            await self.store.delete_image(old.name, sha)

    async def get(self, name: str, *, missing_ok: bool = False) -> Classifier | None:
        classifier = None
        if NAME_PATTERN.fullmatch(name):
            classifier = self._loaded.get(name)
            # The store is the truth: another replica (Redis) may have defined, replaced or deleted it.
            try:
                digest = await self.store.digest(name)
            except StoreUnavailable:
                if classifier is None:
                    raise
                digest = classifier.stored_digest  # Redis is down: serve what this replica has
            if digest is None and classifier is not None:
                self._forget(self._loaded.pop(name))
                classifier = None
            elif digest is not None and (classifier is None or classifier.stored_digest != digest):
                definition = await self.store.load(name)
                classifier = (
                    None
                    if definition is None
                    else await self._adopt(definition, previous=classifier, stored_digest=digest)
                )
        if classifier is None and not missing_ok:
            raise ClassifierNotFound(f"no classifier named {name!r}; create it with PUT /v1/classifiers/{name}")
        return classifier

    async def names(self) -> list[str]:
        return sorted(set(await self.store.names()) | set(self._loaded))

    async def delete(self, name: str) -> bool:
        if not NAME_PATTERN.fullmatch(name):
            return False  # no such name was ever accepted
        async with self._lock(name):
            return await self._delete(name)

    async def _delete(self, name: str) -> bool:
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
        if classifier.status != "ready":
            eta = f", about {classifier.eta_s:.0f} s left" if classifier.eta_s is not None else ""
            raise ClassifierNotReady(
                f"classifier {name!r} is being prepared: {classifier.prompts_prepared:,} of "
                f"{classifier.definition.prompts:,} prompts{eta}",
                param="classifier",
                headers={"Retry-After": str(max(1, round(classifier.eta_s or 1)))},
            )
        return classifier

    # --- preparation ---------------------------------------------------------------------------------------------

    async def _adopt(
        self,
        definition: Definition,
        *,
        previous: Classifier | None = None,
        embedded: dict[str, np.ndarray] | None = None,
        stored_digest: str | None = None,
    ) -> Classifier:
        """Makes `definition` this replica's classifier of its name, reusing what `previous` (the one it replaces)
        already has: its label vectors when the labels are the same, its example embeddings (same model)."""
        old = self._loaded.pop(definition.name, None)
        if old is not None:
            self._forget(old)
        classifier = Classifier(definition, stored_digest=stored_digest or definition.digest)
        wanted = {sha for _, sha in definition.examples}
        for source in (previous.embedded if previous else {}, embedded or {}):
            classifier.embedded.update({sha: vector for sha, vector in source.items() if sha in wanted})
        self._loaded[definition.name] = classifier
        self._set_progress(classifier)
        same_labels = previous is not None and previous.definition.text_digest == definition.text_digest
        try:
            matrix = previous.matrix if same_labels and previous is not None else await self._cached(definition)
        except Exception as error:  # an unreadable slice file, Redis gone: say so rather than prepare forever
            log.exception("classifier %s: cached vectors unreadable", definition.name)
            classifier.status, classifier.error = "failed", f"{type(error).__name__}: {error}"
            return classifier
        if self._loaded.get(definition.name) is not classifier:
            return classifier  # superseded while awaiting the cache: the newer one prepares, not this one
        if matrix is not None and wanted <= set(classifier.embedded):
            self._finish(classifier, matrix)
        else:
            classifier.matrix = matrix
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
        matrix = await self.label_cache.cached_matrix(definition.labels, definition.templates)
        if matrix is not None and self.slice_files is not None:
            # Found in the memory tier only: save it as slices too, or a restart would have to encode it again.
            for start, stop in self._slices(definition):
                await asyncio.to_thread(self.slice_files.save, definition, start, matrix[start:stop])
        return matrix

    async def _prepare(self, classifier: Classifier) -> None:
        try:
            while True:
                try:
                    matrix = (
                        classifier.matrix if classifier.matrix is not None else await self._prepare_text(classifier)
                    )
                    await self._embed_examples(classifier)
                    break
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise
                    # A computation this one joined was cancelled under it (its other waiters left); finished
                    # slices are cached, so starting over only redoes the rest.
                    log.info("classifier %s: shared work was cancelled; continuing", classifier.definition.name)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an engine failed: say so on GET and /classify, and in the log
            log.exception("preparing classifier %s failed", classifier.definition.name)
            classifier.status, classifier.error = "failed", f"{type(error).__name__}: {error}"
            return
        self._finish(classifier, matrix)
        definition = classifier.definition
        log.info(
            "classifier %s ready: %d labels x %d templates, %d examples",
            definition.name,
            len(definition.labels),
            len(definition.templates),
            len(definition.examples),
        )

    async def _embed_examples(self, classifier: Classifier) -> None:
        """Embeds the stored example images this replica has no embedding of (a restart, another model)."""
        missing = [sha for _, sha in classifier.definition.examples if sha not in classifier.embedded]
        deadline = Deadline.after(_PREPARATION_BUDGET_S)
        for start in range(0, len(missing), 32):
            images = []
            for sha in missing[start : start + 32]:
                data = await self.store.load_image(classifier.definition.name, sha)
                if data is None:
                    raise LookupError(f"example image {sha} is missing from the store")
                images.append(ImageInput(data, f"example {sha}"))
            for attempt in range(120):  # the image queue is the live one: when it is full, wait for room
                try:
                    vectors = await self.encode_images(images, deadline)
                    break
                except Overloaded:
                    if attempt == 119:
                        raise
                    await asyncio.sleep(1.0)
            classifier.embedded.update(zip(missing[start : start + 32], vectors, strict=True))

    async def _prepare_text(self, classifier: Classifier) -> np.ndarray:
        definition = classifier.definition
        deadline = Deadline.after(_PREPARATION_BUDGET_S)
        parts: list[np.ndarray] = []
        for start, stop in self._slices(definition):
            part = self.slice_files.load(definition, start, stop - start) if self.slice_files else None
            if part is None:
                labels = definition.labels[start:stop]
                cached = await self.label_cache.cached_matrix(labels, definition.templates)
                if cached is None:
                    part = await self.label_cache.label_matrix(labels, definition.templates, deadline, background=True)
                    classifier.encoded_prompts += len(labels) * len(definition.templates)
                else:
                    part = cached
                if self.slice_files is not None:
                    await asyncio.to_thread(self.slice_files.save, definition, start, part)
            parts.append(part)
            classifier.prompts_prepared = stop * len(definition.templates)
            self._set_progress(classifier)
        return np.concatenate(parts)

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
