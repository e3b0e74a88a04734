"""Schemathesis against the service's own OpenAPI schema, in-process (ASGI) with the demo model: every operation
with every check (its examples, coverage and fuzzing phases; a bounded, seeded number of examples), then stateful
sequences (create a classifier, use it, add examples, delete it). No 5xx, no answer outside its declared schema,
no request the schema calls valid refused, no request it calls invalid accepted.

The schema cannot say that an image decodes: it marks image fields with a format ("byte": base64, "binary": a file,
"data-url"), and the strategies registered below make images that decode. A multipart label's rule depends on how
many label fields there are ("form-label"): its strategy makes labels valid in any number. What is left beyond the
schema is exempt from the one check it defeats, case by case (`_beyond_the_schema`).
"""

from __future__ import annotations

import base64
import copy
import io
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from models.templates import MAX_TEMPLATES
from service.app import create_app
from service.settings import Settings

# Small limits keep each request cheap, and the schema the app publishes states them: the fuzzer reaches every
# limit. max_prompts (labels x templates, which JSON Schema cannot multiply) stays above the most any request can
# ask for, so that rule never decides.
SETTINGS: dict[str, Any] = {
    "max_images": 3,
    "max_labels": 4,
    "max_label_chars": 24,
    "max_texts": 4,
    "max_text_chars": 64,
    "max_classifier_labels": 4,
    "max_prompts": 4 * MAX_TEMPLATES,
}
# Fuzzing examples per operation; the coverage phase adds its own boundary cases.
MAX_EXAMPLES = 25
SEED = 20240611
STEPS = 8  # calls per stateful scenario


def _image_file(size: tuple[int, int], mode: str, file_format: str, colour: int) -> bytes:
    image = Image.new(mode, size, colour)
    if file_format == "JPEG" and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    return buffer.getvalue()


IMAGE_FILES = st.builds(
    _image_file,
    size=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P", "1"]),
    file_format=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]),
    colour=st.integers(0, 255),
)
DATA_URLS = IMAGE_FILES.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode())
FORMATS = {
    "byte": st.one_of(IMAGE_FILES.map(lambda data: base64.b64encode(data).decode()), DATA_URLS),
    "binary": IMAGE_FILES,
    "data-url": DATA_URLS,
    # Neither a comma (a single field is split at commas) nor a leading "[" (a single field is then a JSON list).
    "form-label": st.text(st.characters(exclude_characters=",", codec="utf-8"), min_size=1)
    .map(str.strip)
    .filter(lambda label: label and not label.startswith("["))
    .map(lambda label: label[: SETTINGS["max_label_chars"]].strip())
    .filter(bool),
}


class _AppPerLifespan:
    """The app under test. Schemathesis' pytest plugin ends the lifespan after every test and starts it again for
    the next, and an app serves one lifespan (its drain is one-way): each start gets a new app, with the same
    settings and an empty state directory of its own."""

    def __init__(self) -> None:
        self.app: Any = None
        self.state_dirs: list[str] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.state_dirs.append(tempfile.mkdtemp(prefix="clipserve-fuzz-"))
            self.app = create_app(Settings(**SETTINGS, state_dir=self.state_dirs[-1]))
        await self.app(scope, receive, send)


# Made at import, to parametrize over the operations, from an app that never starts; the schema is the one a running
# app publishes (test_the_published_schema_is_the_one_tested).
PUBLISHED = create_app(Settings(**SETTINGS, state_dir=Path(tempfile.gettempdir()) / "clipserve-fuzz-unused")).openapi()
schema = schemathesis.openapi.from_dict(
    copy.deepcopy(PUBLISHED),  # schemathesis adds the links it infers
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"max-steps": STEPS}},
        }
    ),
)
schema.app = _AppPerLifespan()
# Registered at import: schemathesis builds the coverage phase's cases when it collects the tests.
for _name, _strategy in FORMATS.items():
    schemathesis.openapi.format(_name, _strategy)


@pytest.fixture(scope="module", autouse=True)
def _state_dirs() -> Iterator[None]:
    yield
    for directory in schema.app.state_dirs:
        shutil.rmtree(directory, ignore_errors=True)


def _refused_image(case: schemathesis.Case, error: dict) -> bool:
    """Whether the error is about an image: one that does not decode, is not an image or is too large."""
    field = re.fullmatch(r"(images?|input)\[(\d+)\]", error.get("param") or "")
    if field is None:
        return False
    if field[1] != "input":
        return True
    # An /v1/embeddings input is an image when it is a data:image/... URL.
    given = case.body.get("input") if isinstance(case.body, dict) else None
    inputs = given if isinstance(given, list) else [given]
    item = inputs[int(field[2])] if int(field[2]) < len(inputs) else None
    return isinstance(item, str) and item[:11].lower() == "data:image/"


def _beyond_the_schema(case: schemathesis.Case, response: schemathesis.Response) -> list:
    """The checks this answer is exempt from, each for a rule that JSON Schema cannot state."""
    exempt = []
    error = response.json().get("error", {}) if response.status_code in (413, 415, 422) else {}
    # The registered formats make images that decode, but the coverage phase's boundary values (the shortest string
    # a pattern admits, an empty file) ignore formats: such an image is refused, rightly.
    if error and _refused_image(case, error):
        exempt.append(positive_data_acceptance)
    # A few-shot example's label must be one of its classifier's, and its examples are capped in total: state that
    # the request's shape cannot show.
    message = error.get("message", "")
    if case.operation.path == "/v1/classifiers/{name}/examples" and (
        "is not one of classifier" in message or "examples; the limit is" in message
    ):
        exempt.append(positive_data_acceptance)
    return exempt


@schema.parametrize()
def test_every_operation_keeps_to_its_schema(case: schemathesis.Case) -> None:
    response = case.call()
    case.validate_response(response, excluded_checks=_beyond_the_schema(case, response))


def test_the_published_schema_is_the_one_tested() -> None:
    with asgi.get_client(schema.app) as client:
        assert client.get("/openapi.json").json() == PUBLISHED


class _Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls linked by their data (a PUT's name in the next GET, ...). Each scenario runs against a new
    app, and waits for a classifier's preparation, so that a scenario's answers follow from its calls alone (as
    Hypothesis requires to replay it), not from the scenarios before or from timing."""

    def teardown(self) -> None:
        asgi.shutdown_lifespans()

    def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
        super().after_call(response, case)
        if case.operation.path.startswith("/v1/classifiers/") and response.status_code == 202:
            with asgi.get_client(schema.app) as client:
                _wait_until_prepared(client, response.json()["name"])

    def validate_response(self, response, case, additional_checks=None, **kwargs):  # type: ignore[no-untyped-def]
        case.validate_response(
            response,
            additional_checks=additional_checks,
            excluded_checks=_beyond_the_schema(case, response),
            transport_kwargs=kwargs or None,
            recorder=getattr(self, "recorder", None),
        )


def _wait_until_prepared(client: Any, name: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/classifiers/{name}").json().get("status") == "preparing":
        if time.monotonic() > deadline:
            raise AssertionError(f"classifier {name!r} still preparing after {timeout_s:g} s")
        time.sleep(0.01)


def test_sequences_of_operations_keep_to_the_schema() -> None:
    _Workflow.run(
        settings=hypothesis.settings(
            max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None, stateful_step_count=STEPS
        )
    )
