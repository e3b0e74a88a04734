"""Where classifier definitions live: Redis when it is configured (every replica sees them), else files in the
state directory (CLIPSERVE_STATE_DIR), so that a restart keeps them either way.

A definition is the name, the labels and the resolved templates; it does not depend on the model, so the same
definition is prepared again, automatically, for whichever model a replica serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from service.errors import StoreUnavailable

# URL-safe, and safe as a file name: no separators, no leading dot.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Definition(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    labels: list[str]
    templates: tuple[str, ...]
    created: float  # time.time() of the PUT that made it
    # Few-shot example images, by (label index, sha256 prefix of the image file); the files live in the store.
    examples: tuple[tuple[int, str], ...] = ()

    @classmethod
    def new(cls, name: str, labels: list[str], templates: tuple[str, ...]) -> Definition:
        return cls(name=name, labels=labels, templates=templates, created=time.time())

    @property
    def text_digest(self) -> str:
        """Names the label vectors' content (labels and templates), not the name: a replaced definition never
        reuses slices saved for the old one, and putting the same labels twice changes nothing."""
        content = json.dumps([self.labels, list(self.templates)], ensure_ascii=False).encode()
        return hashlib.blake2b(content, digest_size=12).hexdigest()

    @property
    def digest(self) -> str:
        """The whole content, examples included: what replicas compare to see a change made elsewhere."""
        content = json.dumps([self.text_digest, [list(example) for example in self.examples]]).encode()
        return hashlib.blake2b(content, digest_size=12).hexdigest()

    def examples_per_label(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for index, _ in self.examples:
            counts[self.labels[index]] = counts.get(self.labels[index], 0) + 1
        return counts

    @property
    def prompts(self) -> int:
        return len(self.labels) * len(self.templates)


class DefinitionStore(Protocol):
    async def save(self, definition: Definition) -> None: ...

    async def load(self, name: str) -> Definition | None: ...

    async def digest(self, name: str) -> str | None:
        """The stored definition's content digest, or None if there is none: a cheap check, per request, that
        another replica has not replaced or deleted it."""
        ...

    async def names(self) -> list[str]: ...

    async def delete(self, name: str) -> bool:
        """The definition and every example image of it."""
        ...

    async def save_image(self, name: str, sha: str, data: bytes) -> None: ...

    async def load_image(self, name: str, sha: str) -> bytes | None: ...

    async def delete_image(self, name: str, sha: str) -> None: ...

    async def close(self) -> None: ...


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


class FileDefinitions:
    """One JSON file per classifier in `{state_dir}/classifiers/`."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "classifiers"

    async def save(self, definition: Definition) -> None:
        try:
            _atomic_write(self.directory / f"{definition.name}.json", definition.model_dump_json().encode())
            _atomic_write(self.directory / f"{definition.name}.digest", definition.digest.encode())
        except OSError as error:
            raise StoreUnavailable(
                f"cannot save the classifier in {self.directory} ({error.strerror}); set CLIPSERVE_STATE_DIR to a "
                "writable directory, or CLIPSERVE_REDIS_URL"
            ) from error

    async def digest(self, name: str) -> str | None:
        path = self.directory / f"{name}.digest"
        return path.read_text() if path.is_file() else None

    async def load(self, name: str) -> Definition | None:
        path = self.directory / f"{name}.json"
        return Definition.model_validate_json(path.read_bytes()) if path.is_file() else None

    async def names(self) -> list[str]:
        return sorted(path.stem for path in self.directory.glob("*.json")) if self.directory.is_dir() else []

    async def delete(self, name: str) -> bool:
        path = self.directory / f"{name}.json"
        existed = path.is_file()
        (self.directory / f"{name}.digest").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        shutil.rmtree(self.directory / f"{name}.examples", ignore_errors=True)
        return existed

    async def save_image(self, name: str, sha: str, data: bytes) -> None:
        try:
            _atomic_write(self.directory / f"{name}.examples" / sha, data)
        except OSError as error:
            raise StoreUnavailable(f"cannot save the example in {self.directory} ({error.strerror})") from error

    async def load_image(self, name: str, sha: str) -> bytes | None:
        path = self.directory / f"{name}.examples" / sha
        return path.read_bytes() if path.is_file() else None

    async def delete_image(self, name: str, sha: str) -> None:
        (self.directory / f"{name}.examples" / sha).unlink(missing_ok=True)

    async def close(self) -> None:
        return None


class RedisDefinitions:
    """One Redis key per classifier, `clipserve:classifiers:{name}`, shared by every replica."""

    PREFIX = "clipserve:classifiers:"
    DIGEST = "#digest"  # not a valid name character: never a classifier's own key
    EXAMPLE = "#example:"

    def __init__(self, url: str, timeout_s: float) -> None:
        # Definitions are few and small; a generous timeout (not the label cache's 100 ms) suits them.
        self.client = aioredis.Redis.from_url(url, socket_timeout=max(timeout_s, 2.0), socket_connect_timeout=2.0)

    async def _call(self, operation):  # type: ignore[no-untyped-def]
        try:
            return await operation
        except (RedisError, OSError) as error:
            raise StoreUnavailable(f"the classifier store (Redis) is unavailable: {error}") from error

    async def save(self, definition: Definition) -> None:
        key = self.PREFIX + definition.name
        await self._call(self.client.mset({key: definition.model_dump_json(), key + self.DIGEST: definition.digest}))

    async def digest(self, name: str) -> str | None:
        raw = await self._call(self.client.get(self.PREFIX + name + self.DIGEST))
        return None if raw is None else raw.decode()

    async def load(self, name: str) -> Definition | None:
        raw = await self._call(self.client.get(self.PREFIX + name))
        return None if raw is None else Definition.model_validate_json(raw)

    async def names(self) -> list[str]:
        keys = await self._scan(self.PREFIX + "*")
        # "#" is not a name character: it marks a classifier's digest and example keys.
        return sorted(name for key in keys if "#" not in (name := key.decode().removeprefix(self.PREFIX)))

    async def _scan(self, pattern: str) -> list[bytes]:
        """SCAN, not KEYS: the keyspace is shared with every label vector, and KEYS would block Redis on it."""

        async def collect() -> list[bytes]:
            return [key async for key in self.client.scan_iter(match=pattern, count=1000)]

        return await self._call(collect())

    async def delete(self, name: str) -> bool:
        images = await self._scan(self.PREFIX + name + self.EXAMPLE + "*")
        keys: list[str | bytes] = [self.PREFIX + name, self.PREFIX + name + self.DIGEST, *images]
        return bool(await self._call(self.client.delete(*keys)))

    async def save_image(self, name: str, sha: str, data: bytes) -> None:
        await self._call(self.client.set(self.PREFIX + name + self.EXAMPLE + sha, data))

    async def load_image(self, name: str, sha: str) -> bytes | None:
        raw = await self._call(self.client.get(self.PREFIX + name + self.EXAMPLE + sha))
        return raw if isinstance(raw, bytes) else None

    async def delete_image(self, name: str, sha: str) -> None:
        await self._call(self.client.delete(self.PREFIX + name + self.EXAMPLE + sha))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class SliceFiles:
    """Without Redis, a classifier's finished slices of label vectors, as `.npy` files under the state directory,
    per model (the label cache's namespace) and definition content: a restart continues where it stopped."""

    def __init__(self, state_dir: Path, namespace: str) -> None:
        self.root = state_dir / "vectors"
        self.model = hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()

    def _dir(self, definition: Definition) -> Path:
        return self.root / definition.name / self.model / definition.text_digest

    def load(self, definition: Definition, start: int, rows: int) -> np.ndarray | None:
        path = self._dir(definition) / f"{start:07d}.npy"
        if not path.is_file():
            return None
        vectors = np.load(path)
        return vectors if vectors.shape[0] == rows else None  # another slicing: encode it again

    def save(self, definition: Definition, start: int, vectors: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32))
        _atomic_write(self._dir(definition) / f"{start:07d}.npy", buffer.getvalue())

    def forget(self, definition: Definition) -> None:
        """This model's slices of a definition that was replaced by one with other labels or templates."""
        shutil.rmtree(self._dir(definition), ignore_errors=True)

    def delete(self, name: str) -> None:
        """Every model's slices of the classifier."""
        shutil.rmtree(self.root / name, ignore_errors=True)
