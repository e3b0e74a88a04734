"""Typed route inputs (service/inputs.py): one model per route for JSON and multipart, every limit in one place,
an OpenAPI schema generated from the body models, one deadline per request, base64 decoded off the event loop."""

from __future__ import annotations

import threading

import pytest

from models.templates import SIMPLE_7
from service import schemas
from service.batcher import DynamicBatcher
from service.errors import InvalidInput, NotFound
from service.images import ImageInput
from service.inputs import ClassifyInput, EmbeddingsInput, EmbedInput, Served, validated
from service.settings import Settings
from tests.service.conftest import b64, running_app, shape_png

LABELS = ["red circle", "blue triangle"]


def _served(**overrides: object) -> Served:
    return Served(Settings(**overrides), "demo", 64)  # type: ignore[arg-type]


def _refusal(model: type, fields: dict, context: Served) -> InvalidInput:
    with pytest.raises(InvalidInput) as refused:
        validated(model, fields, context)
    return refused.value


def test_classify_input_resolves_templates_and_checks_every_limit_in_one_place() -> None:
    image = ImageInput(b64(shape_png()), "images[0]")
    ok = validated(ClassifyInput, {"images": [image], "labels": LABELS, "templates": None, "top_k": 1}, _served())
    assert ok.templates == SIMPLE_7  # the server's default preset, "simple"
    context = _served(max_images=1, max_labels=2, max_prompts=10)
    fields = {"images": [image], "labels": LABELS, "templates": "simple", "top_k": None}
    too_many_images = _refusal(ClassifyInput, fields | {"images": [image] * 2}, context)
    assert too_many_images.param == "images" and "2 images" in too_many_images.message
    # Multipart's files arrive as `image`: the error names the field the client used.
    files = [ImageInput(b"", "image[0]"), ImageInput(b"", "image[1]")]
    assert _refusal(ClassifyInput, fields | {"images": files}, context).param == "image"
    assert _refusal(ClassifyInput, fields | {"labels": ["a", "b", "c"]}, context).param == "labels"
    prompts = _refusal(ClassifyInput, fields, context)  # 2 labels x 7 templates = 14 > 10
    assert "14 prompts" in prompts.message and prompts.param == "labels"
    assert _refusal(ClassifyInput, fields | {"templates": "nope"}, context).param == "templates"
    assert _refusal(ClassifyInput, fields | {"top_k": 0}, _served()).param == "top_k"


def test_embed_input_checks_texts_as_labels_only_with_templates() -> None:
    context = _served(max_text_chars=10, max_label_chars=5)
    plain = {"images": [], "texts": ["123456789"], "templates": None, "encoding_format": "float"}
    assert validated(EmbedInput, plain, context).templates is None
    assert _refusal(EmbedInput, plain | {"templates": "photo"}, context).param == "texts[0]"  # a 9-char label
    assert _refusal(EmbedInput, plain | {"texts": []}, context).message == "give images, texts or both"


def test_the_openapi_schema_describes_both_content_types_from_the_models() -> None:
    from service.app import create_app

    spec = create_app().openapi()

    def described(schema: dict) -> dict:
        # FastAPI re-serialises schemas (drops `default: null`, writes 1 as 1.0): compare what a client reads.
        return {name: field.get("description") for name, field in schema["properties"].items()} | {
            "(required)": sorted(schema.get("required", []))
        }

    body = spec["paths"]["/classify"]["post"]["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"application/json", "multipart/form-data"}
    assert described(body["content"]["application/json"]["schema"]) == described(
        schemas.ClassifyRequest.model_json_schema()
    )
    form = body["content"]["multipart/form-data"]["schema"]
    assert described(form) == described(schemas.ClassifyForm.model_json_schema())
    assert form["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    assert set(form["required"]) == {"image"} and {"labels", "classifier"} <= set(form["properties"])
    for path, model in (("/embed", schemas.EmbedRequest), ("/v1/embeddings", schemas.OpenAIEmbeddingsRequest)):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == ["application/json"]
        assert described(content["application/json"]["schema"]) == described(model.model_json_schema())


def test_the_published_schema_states_the_apps_own_limits_and_model() -> None:
    from service.app import create_app

    spec = create_app(Settings(max_images=3, max_labels=7, max_label_chars=9)).openapi()  # type: ignore[call-arg]
    classify = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    json_body, form = classify["application/json"]["schema"], classify["multipart/form-data"]["schema"]
    assert json_body["properties"]["images"]["maxItems"] == form["properties"]["image"]["maxItems"] == 3
    labels = json_body["properties"]["labels"]["anyOf"][0]
    assert labels["maxItems"] == 7 and labels["items"]["maxLength"] == 9
    assert classify["multipart/form-data"]["encoding"]["image"]["contentType"].startswith("image/*")
    # Labels or a saved classifier, exactly one of them.
    assert [sorted(branch["required"]) for branch in json_body["oneOf"]] == [["labels"], ["classifier"]]
    embeddings = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # The model's name and dimension come from its manifest, before the model is loaded.
    assert embeddings["properties"]["dimensions"]["anyOf"][0]["enum"] == [64]
    assert embeddings["properties"]["model"]["anyOf"][0]["enum"] == ["clipserve-demo"]

    def references(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [ref for value in node.values() for ref in references(value)]
        return [ref for value in node for ref in references(value)] if isinstance(node, list) else []

    # Every reference resolves: a fuzzer skips an operation whose body points nowhere.
    for ref in references(spec):
        assert ref.startswith("#/components/schemas/") and ref.rpartition("/")[2] in spec["components"]["schemas"]


async def test_a_request_has_one_deadline_for_every_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image batcher, the text batcher (through the label cache and the text encoder) and the route's own
    timeout all read the deadline the route made; a second request gets its own."""
    seen: list[tuple[str, float]] = []
    submit = DynamicBatcher.submit

    async def spy(self: DynamicBatcher, rows, *, deadline: float):  # type: ignore[no-untyped-def]
        seen.append((self.name, deadline))
        return await submit(self, rows, deadline=deadline)

    monkeypatch.setattr(DynamicBatcher, "submit", spy)
    async with running_app(request_timeout_s=120) as (_, client):
        body = {"images": [b64(shape_png())], "labels": ["a new label", "another new one"]}
        assert (await client.post("/classify", json=body)).status_code == 200
        first = {deadline for _, deadline in seen}
        assert {name for name, _ in seen} == {"image", "text"} and len(first) == 1
        seen.clear()
        body = {"images": [b64(shape_png())], "texts": ["a text"]}
        assert (await client.post("/embed", json=body)).status_code == 200
        second = {deadline for _, deadline in seen}
        assert {name for name, _ in seen} == {"image", "text"} and len(second) == 1 and second != first


async def test_base64_images_are_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    decoded = ImageInput.decoded

    def spy(self: ImageInput) -> bytes:
        threads.append(threading.current_thread().name)
        return decoded(self)

    monkeypatch.setattr(ImageInput, "decoded", spy)
    async with running_app() as (_, client):
        body = {"images": [b64(shape_png()), b64(shape_png("circle"))], "labels": LABELS}
        assert (await client.post("/classify", json=body)).status_code == 200
        files = [("image", ("a.png", shape_png(), "image/png"))]
        assert (await client.post("/classify", files=files, data={"labels": "a,b"})).status_code == 200
    assert len(threads) == 3 and threading.main_thread().name not in threads
    assert all(name.startswith("clipserve-decode") for name in threads)


def test_embeddings_input_checks_model_dimensions_and_emptiness() -> None:
    context = _served(max_texts=2)
    fields = {"inputs": ["a"], "model": None, "dimensions": None, "encoding_format": "float"}
    assert validated(EmbeddingsInput, fields, context).texts == ["a"]
    with pytest.raises(NotFound):
        validated(EmbeddingsInput, fields | {"model": "another"}, context)
    assert _refusal(EmbeddingsInput, fields | {"dimensions": 65}, context).param == "dimensions"
    assert _refusal(EmbeddingsInput, fields | {"inputs": []}, context).param == "input"
    assert "3 texts" in _refusal(EmbeddingsInput, fields | {"inputs": ["a", "b", "c"]}, context).message
    assert (
        _refusal(
            EmbedInput, {"images": [], "texts": [], "templates": ["{}"], "encoding_format": "float"}, context
        ).param
        == "images"
    )


@pytest.mark.parametrize(
    ("data", "param", "message"),
    [
        ({"labels": "[not json"}, "labels", "not a valid JSON list"),
        ({"labels": '["a", 1]'}, "labels", "JSON list of strings"),
        ({"labels": "a,b", "templates": '{"a": 1}'}, "templates", None),  # not a list: a (bad) preset name
        ({"labels": "a,b", "templates": "[1]"}, "templates", "JSON list of strings"),
        ({"labels": "a,b", "image": "not a file"}, "image[0]", "must be a file upload"),
    ],
)
async def test_multipart_fields_are_checked_like_json(data: dict, param: str, message: str | None) -> None:
    async with running_app() as (_, client):
        # A text field named `image` instead of a file: an unrelated file part keeps the body multipart.
        file = ("other", ("a.txt", b"x", "text/plain")) if "image" in data else ("image", ("a.png", shape_png()))
        response = await client.post("/classify", files=[file], data=data)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == param and (message is None or message in error["message"])


def test_input_models_need_the_served_context() -> None:
    with pytest.raises(TypeError, match="context"):
        ClassifyInput.model_validate({"images": [], "labels": ["a"], "templates": None, "top_k": None})
