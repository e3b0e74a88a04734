"""Property tests (Hypothesis) of what a client controls: the image decoder and the label and template rules.

Whatever the bytes or strings, the answer is a decoded image / a validated input, or one of the service's own 4xx
errors, never anything else (which would be a 500). Where the published schema states a rule (service/schemas.py),
it accepts exactly what the check accepts, read by both a Python and an ECMA-262-style (Rust) regex engine.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import jsonschema
import jsonschema_rs
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocess import ImageTransform, PreprocessConfig
from models.templates import MAX_TEMPLATE_LENGTH, MAX_TEMPLATES, PRESETS
from service import schemas
from service.app import create_app
from service.errors import InvalidInput, InvalidRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.images import decode_base64, decode_image, preprocess
from service.inputs import (
    ClassifyInput,
    Served,
    _form_labels,
    _form_templates,
    _form_top_k,
    check_labels,
    templates_or_default,
    validated,
)
from service.settings import Settings

# Deterministic, so CI sees the same examples every run; no example database left in the working tree.
PROPERTIES = settings(max_examples=150, derandomize=True, database=None, deadline=None)
IMAGE_ERRORS = (InvalidInput, UnsupportedMediaType, PayloadTooLarge)
MAX_PIXELS = 1 << 20  # small, so that a header claiming a large image is refused before anything is decoded
TRANSFORM = ImageTransform(PreprocessConfig(image_size=32))
LIMITS = Settings(max_labels=5, max_label_chars=12)  # type: ignore[call-arg]

# ------------------------------------------------------------------------------------------------- images

FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    "WEBP": ["RGB", "RGBA"],
    "TIFF": ["1", "L", "P", "RGB", "RGBA", "CMYK"],
}


@st.composite
def image_files(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    file_format = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[file_format]))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    pixels = draw(st.binary(min_size=16, max_size=16))
    image = Image.frombytes("L", (4, 4), pixels).resize(size).convert(mode) if mode != "I;16" else None
    if image is None:
        image = Image.new("I;16", size, draw(st.integers(0, 65535)))
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    return buffer.getvalue(), size


@PROPERTIES
@given(image_files())
def test_valid_images_of_any_size_and_mode_decode(file: tuple[bytes, tuple[int, int]]) -> None:
    data, size = file
    assert decode_image(data, max_pixels=MAX_PIXELS, param="images[0]").size == size
    pixels = preprocess(data, TRANSFORM, max_pixels=MAX_PIXELS, param="images[0]")
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32 and np.isfinite(pixels).all()
    # As base64, plain or a data: URL, the same file.
    text = base64.b64encode(data).decode()
    assert decode_base64(text, "images[0]") == decode_base64(f"data:image/png;base64,{text}", "images[0]") == data


def _decoded_or_refused(data: bytes) -> None:
    try:
        pixels = preprocess(data, TRANSFORM, max_pixels=MAX_PIXELS, param="image[0]")
    except IMAGE_ERRORS as error:
        assert error.param == "image[0]" and 400 <= error.status < 500
    else:
        assert pixels.shape == (3, 32, 32) and np.isfinite(pixels).all()


@PROPERTIES
@given(st.binary(max_size=512))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")  # a signature and nothing after it
@example(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # a format Pillow reads but the service refuses
def test_arbitrary_bytes_decode_or_get_a_client_error(data: bytes) -> None:
    _decoded_or_refused(data)


@settings(PROPERTIES, suppress_health_check=[HealthCheck.too_slow])
@given(image_files(), st.data())
def test_damaged_images_decode_or_get_a_client_error(file: tuple[bytes, tuple[int, int]], data: st.DataObject) -> None:
    original = bytearray(file[0])
    # What a broken upload looks like: cut short, or with some bytes changed (headers included).
    cut = data.draw(st.integers(0, len(original)))
    damaged = original[:cut] if data.draw(st.booleans()) else original
    for _ in range(data.draw(st.integers(0, 8))):
        if damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    _decoded_or_refused(bytes(damaged))


@PROPERTIES
@given(st.text(max_size=200) | st.from_regex(r"data:[a-z/]*(;[a-z]+=[a-z]*)*(;base64)?,[A-Za-z0-9+/=\s]*"))
def test_base64_text_decodes_or_gets_a_client_error(text: str) -> None:
    try:
        assert isinstance(decode_base64(text, "images[0]"), bytes)
    except (InvalidInput, UnsupportedMediaType) as error:
        assert error.param == "images[0]"


# ------------------------------------------------------------------------------------------------- labels


# The /classify JSON body's schema as a server with LIMITS publishes it.
CLASSIFY_SCHEMA = create_app(LIMITS).openapi()["paths"]["/classify"]["post"]["requestBody"]["content"][
    "application/json"
]["schema"]


def _both_engines_accept(schema: dict[str, Any], value: object) -> bool:
    python = jsonschema.Draft202012Validator(schema).is_valid(value)
    rust = jsonschema_rs.Draft202012Validator(schema).is_valid(value)
    assert python == rust, f"the regex dialects disagree on {value!r}"
    return python


LABEL_LISTS = st.lists(st.text(max_size=16) | st.sampled_from(["\x1c", "\x85", "\ufeff", " a ", "\u3000"]), max_size=7)


@PROPERTIES
@given(LABEL_LISTS)
def test_labels_are_checked_as_the_schema_says(labels: list[str]) -> None:
    try:
        check_labels(labels, LIMITS, "labels")
        accepted = True
    except InvalidInput as error:
        assert error.param is not None and error.param.startswith("labels")
        accepted = False
    assert _both_engines_accept(CLASSIFY_SCHEMA["properties"]["labels"]["anyOf"][0], labels) == accepted


@PROPERTIES
@given(st.lists(st.text(max_size=30), max_size=4))
def test_form_labels_are_split_and_checked_or_refused(fields: list[str]) -> None:
    try:
        labels = _form_labels(fields)
        if labels is not None:
            check_labels(labels, LIMITS, "labels")
    except InvalidInput as error:
        assert error.param is not None and error.param.startswith("labels")
    else:
        assert labels is None or all(label.strip() for label in labels)


# ---------------------------------------------------------------------------------------------- templates

# Templates built from the pieces that matter to str.format: braces, escapes, fields with names and specs.
TEMPLATE_TEXT = st.lists(st.sampled_from(["{", "}", "{}", "{{", "}}", "a", " ", "0", ":", "!r", "x", "[", "."])).map(
    "".join
)
TEMPLATES = st.one_of(
    st.none(),
    st.sampled_from([*PRESETS, "nope", ""]),
    st.lists(TEMPLATE_TEXT | st.text(max_size=20), max_size=4),
    st.just(["{}"] * (MAX_TEMPLATES + 1)),
    st.just(["{}" + "x" * MAX_TEMPLATE_LENGTH]),
)


@PROPERTIES
@given(TEMPLATES)
def test_templates_are_checked_as_the_schema_says(templates: str | list[str] | None) -> None:
    try:
        resolved = templates_or_default(templates, LIMITS)
    except InvalidInput as error:
        assert error.param == "templates"
        accepted = False
    else:
        accepted = True
        # Each has one slot for the label, and the label lands in it whole.
        assert resolved and all(template.format("\x00label\x00").count("\x00label\x00") == 1 for template in resolved)
    published = CLASSIFY_SCHEMA["properties"]["templates"]
    assert _both_engines_accept(published, templates) == accepted


@PROPERTIES
@given(TEMPLATE_TEXT)
def test_one_template_is_usable_exactly_when_it_matches_the_pattern(template: str) -> None:
    matches = _both_engines_accept({"type": "string", "pattern": schemas.TEMPLATE_PATTERN}, template)
    try:
        templates_or_default([template], LIMITS)
        assert matches
    except InvalidInput:
        assert not matches


@PROPERTIES
@given(st.text(max_size=40))
def test_form_fields_parse_or_get_a_client_error(text: str) -> None:
    for parse in (_form_templates, _form_top_k, lambda value: _form_labels([value])):
        try:
            parse(text)
        except InvalidInput as error:
            assert error.param in ("templates", "top_k", "labels")


# ------------------------------------------------------------------------------------- whole request bodies

SERVED = Served(LIMITS, "demo", 64)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CLASSIFY_FIELDS = st.fixed_dictionaries(
    {"images": st.just(["aGk="])},
    optional={
        "labels": LABEL_LISTS | JSON_VALUES,
        "classifier": st.text(max_size=8) | JSON_VALUES,
        "templates": TEMPLATES | JSON_VALUES,
        "top_k": st.integers() | JSON_VALUES,
        "examples_weight": st.floats() | JSON_VALUES,
    },
)


@PROPERTIES
@given(st.binary(max_size=64) | CLASSIFY_FIELDS.map(lambda fields: json.dumps(fields).encode()))
def test_any_classify_body_validates_or_gets_a_client_error(body: bytes) -> None:
    """From the bytes on the wire to ClassifyInput, as the route's dependency does it."""
    try:
        wire = validated(schemas.ClassifyRequest, body)
        fields = wire.model_dump() | {"images": []}
        validated(ClassifyInput, fields, SERVED)
    except (InvalidRequest, InvalidInput) as error:
        assert isinstance(error, ServiceError) and 400 <= error.status < 500


@pytest.mark.parametrize("label", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85"])
def test_python_whitespace_that_ecma_does_not_call_whitespace_is_blank(label: str) -> None:
    """ECMA-262's \\s lacks these: a schema pattern of "\\S" would call them valid labels, which the server refuses."""
    with pytest.raises(InvalidInput):
        check_labels([label], LIMITS, "labels")
    assert not _both_engines_accept(CLASSIFY_SCHEMA["properties"]["labels"]["anyOf"][0], [label])
