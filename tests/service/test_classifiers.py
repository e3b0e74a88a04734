"""Saved classifiers through the API: PUT prepares in the background, /classify by name answers as inline labels
do, the state directory keeps them across a restart without Redis, and Redis shares them between instances."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

import service.app
from service.engines.factory import EnginePair
from tests.service.conftest import b64, engine_calls, live_server, running_app, shape_png

LABELS = ["red circle", "blue triangle", "green square", "yellow hexagon"]


class GatedTextEngine:
    """The real text engine, held at `gate` while the test keeps it closed; calls past `failing_after` wait for
    the gate and then fail: preparation in progress, or cut short, on demand."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.gate, self.stalled, self.entered = (
            inner,
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        self.gate.set()
        self.calls = 0
        self.failing_after: int | None = None

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        failing = self.failing_after is not None and self.calls > self.failing_after
        if failing:
            self.stalled.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        if failing:
            raise RuntimeError("the text engine stopped (by the test)")
        return self.inner(ids)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> list[GatedTextEngine]:
    made: list[GatedTextEngine] = []
    real_build = service.app.build_engines

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        pair = real_build(*args, **kwargs)
        made.append(GatedTextEngine(pair.text))
        return EnginePair(image=pair.image, text=made[-1])

    monkeypatch.setattr(service.app, "build_engines", build)
    return made


async def _settled(client, name: str) -> dict:  # type: ignore[no-untyped-def]
    """The classifier's status once it is no longer preparing (polled: preparation runs in the background)."""
    for _ in range(6000):
        status = (await client.get(f"/v1/classifiers/{name}")).json()
        if status["status"] != "preparing":
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} still preparing after a minute: {status}")


async def _ready(client, name: str) -> dict:  # type: ignore[no-untyped-def]
    status = await _settled(client, name)
    assert status["status"] == "ready", status
    return status


async def test_a_classifier_is_prepared_in_the_background_and_used_by_name(gated) -> None:  # type: ignore[no-untyped-def]
    images = [b64(shape_png("circle", "red")), b64(shape_png("triangle", "blue"))]
    async with running_app(label_chunk_prompts=7) as (app, client):  # one label per slice: progress shows
        gated[-1].gate.clear()
        put = await client.put("/v1/classifiers/shapes", json={"labels": LABELS, "templates": "simple"})
        assert put.status_code == 202, put.text
        assert put.json()["status"] == "preparing" and put.json()["prompts_total"] == 4 * 7
        refused = await client.post("/classify", json={"images": images, "classifier": "shapes"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "classifier_not_ready"
        assert "of 28 prompts" in refused.json()["error"]["message"] and "Retry-After" in refused.headers
        gated[-1].gate.set()
        status = await _ready(client, "shapes")
        assert status["prompts_prepared"] == 28 and status["labels"] == LABELS and status["label_count"] == 4
        assert (
            app.state.metrics.value("clipserve_classifier_prompts", {"classifier": "shapes", "kind": "prepared"}) == 28
        )

        by_name = await client.post("/classify", json={"images": images, "classifier": "shapes"})
        inline = await client.post("/classify", json={"images": images, "labels": LABELS, "templates": "simple"})
        assert by_name.status_code == 200 and by_name.json()["classifier"] == "shapes"
        assert by_name.json()["results"] == inline.json()["results"] and inline.json()["classifier"] is None
        files = [("image", ("a.png", shape_png("circle", "red"), "image/png"))]
        multipart = await client.post("/classify", files=files, data={"classifier": "shapes"})
        one = await client.post("/classify", json={"images": images[:1], "classifier": "shapes"})
        assert multipart.json()["results"] == one.json()["results"]  # the same batch size, the same numbers

        again = await client.put("/v1/classifiers/shapes", json={"labels": LABELS, "templates": "simple"})
        assert again.status_code == 201 and again.json()["status"] == "ready"  # the same content: nothing to do
        listed = (await client.get("/v1/classifiers")).json()["data"]
        assert [c["name"] for c in listed] == ["shapes"] and listed[0]["labels"] is None

        assert (await client.delete("/v1/classifiers/shapes")).status_code == 204
        gone = await client.post("/classify", json={"images": images, "classifier": "shapes"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "classifier_not_found"
        assert (await client.delete("/v1/classifiers/shapes")).status_code == 404
        assert (await client.get("/v1/classifiers")).json()["data"] == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/classifiers/has%20space", {"labels": ["a"]}, "name"),
        ("/v1/classifiers/-dash-first", {"labels": ["a"]}, "name"),
        ("/v1/classifiers/ok", {"labels": ["a", "b", "c", "d"]}, "labels"),  # over max_classifier_labels=3
        ("/v1/classifiers/ok", {"labels": ["a", " "]}, "labels[1]"),
        ("/v1/classifiers/ok", {"labels": ["a"], "templates": ["no placeholder"]}, "templates"),
        ("/v1/classifiers/ok", {"labels": []}, "labels"),
        ("/v1/classifiers/ok", {}, "labels"),
        ("/v1/classifiers/ok", {"labels": ["a", "b", "a"]}, "labels[2]"),
        ("/v1/classifiers/ok", {"builtin": "imagenet-22k"}, "builtin"),
        ("/v1/classifiers/ok", {"builtin": "imagenet-1k", "labels": ["a"]}, "builtin"),
    ],
)
async def test_bad_definitions_are_422s(path: str, body: dict, param: str) -> None:
    async with running_app(max_classifier_labels=3) as (_, client):
        response = await client.put(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param


async def test_classify_names_labels_or_a_classifier_not_both() -> None:
    image = b64(shape_png())
    async with running_app() as (_, client):
        both = await client.post("/classify", json={"images": [image], "labels": ["a"], "classifier": "x"})
        assert both.status_code == 422 and both.json()["error"]["param"] == "classifier"
        neither = await client.post("/classify", json={"images": [image]})
        assert neither.status_code == 422 and neither.json()["error"]["param"] == "labels"
        templates = await client.post("/classify", json={"images": [image], "classifier": "x", "templates": "bare"})
        assert templates.status_code == 422 and templates.json()["error"]["param"] == "templates"
        unknown = await client.post("/classify", json={"images": [image], "classifier": "nothing-here"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "classifier_not_found"
        assert (await client.get("/v1/classifiers/nothing-here")).status_code == 404


async def test_a_restart_without_redis_keeps_classifiers_and_their_vectors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = b64(shape_png())
    async with running_app(state_dir=tmp_path) as (_, client):
        assert (await client.put("/v1/classifiers/kept", json={"labels": LABELS})).status_code == 202
        await _ready(client, "kept")
        before = (await client.post("/classify", json={"images": [image], "classifier": "kept"})).json()
    async with running_app(state_dir=tmp_path) as (app, client):
        status = (await client.get("/v1/classifiers/kept")).json()
        assert status["status"] == "ready"  # from the state directory's slices, at startup
        after = (await client.post("/classify", json={"images": [image], "classifier": "kept"})).json()
        assert after["results"] == before["results"]
        assert engine_calls(app) == 0  # nothing encoded again
        # Replaced with other labels: the old labels' slices go, the new ones' are written.
        slices = tmp_path / "vectors" / "kept"
        old = {path.parent.name for path in slices.rglob("*.npy")}
        assert (await client.put("/v1/classifiers/kept", json={"labels": LABELS[:2]})).status_code in (201, 202)
        await _ready(client, "kept")
        new = {path.parent.name for path in slices.rglob("*.npy")}
        assert len(old) == len(new) == 1 and old != new


async def test_a_restart_continues_a_preparation_where_it_stopped(gated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Twelve labels, a slice (and one engine call) each: the engine fails at the sixth, so five slices are saved;
    the next start encodes only the other seven."""
    labels = [f"thing {i}" for i in range(12)]
    settings = {"state_dir": tmp_path, "label_chunk_prompts": 7, "text_max_batch_size": 7}
    async with running_app(**settings) as (_, client):
        engine = gated[-1]
        engine.failing_after = engine.calls + 5  # after the warm-up's own calls
        assert (await client.put("/v1/classifiers/half", json={"labels": labels})).status_code == 202
        status = await _settled(client, "half")
        assert status["status"] == "failed" and "stopped (by the test)" in status["error"]
        assert status["prompts_prepared"] == 5 * 7
        refused = await client.post("/classify", json={"images": [b64(shape_png())], "classifier": "half"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "classifier_failed"
    async with running_app(**settings) as (app, client):
        status = await _ready(client, "half")
        assert status["prompts_prepared"] == 12 * 7
        assert engine_calls(app) == 7  # only the slices not saved before the restart


async def test_two_instances_share_classifiers_through_redis(redis_server) -> None:  # type: ignore[no-untyped-def]
    image = b64(shape_png())
    async with running_app(redis_url=redis_server.url) as (_, first):
        assert (await first.put("/v1/classifiers/shared", json={"labels": LABELS})).status_code == 202
        await _ready(first, "shared")
        async with running_app(redis_url=redis_server.url) as (second_app, second):
            status = (await second.get("/v1/classifiers/shared")).json()
            assert status["status"] == "ready"  # its vectors were all in Redis
            one = (await first.post("/classify", json={"images": [image], "classifier": "shared"})).json()
            two = (await second.post("/classify", json={"images": [image], "classifier": "shared"})).json()
            assert one["results"] == two["results"] and engine_calls(second_app) == 0
            assert (await second.delete("/v1/classifiers/shared")).status_code == 204
        # Deleted on the second instance: gone on the first too, which checks the store on each use.
        assert (await first.get("/v1/classifiers/shared")).status_code == 404
        gone = await first.post("/classify", json={"images": [image], "classifier": "shared"})
        assert gone.status_code == 404


async def test_an_unwritable_state_directory_is_a_clear_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("")
    async with running_app(state_dir=blocked) as (_, client):
        response = await client.put("/v1/classifiers/x", json={"labels": ["a"]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
        assert "CLIPSERVE_STATE_DIR" in response.json()["error"]["message"]
        assert (await client.post("/classify", json={"images": [b64(shape_png())], "labels": ["a"]})).status_code == 200


async def test_imagenet_1k_with_the_80_templates_is_prepared_with_one_call() -> None:
    """The paper's headline case on the demo model: 1,000 classes x 80 templates = 80,000 prompts, prepared in the
    background with rising progress, then the same probabilities by name as with the labels inline."""
    image = b64(shape_png("circle", "red"))
    async with running_app(request_timeout_s=300) as (_, client):
        put = await client.put("/v1/classifiers/imagenet", json={"builtin": "imagenet-1k"})
        assert put.status_code == 202 and put.json()["prompts_total"] == 80_000
        progress = []
        while (status := (await client.get("/v1/classifiers/imagenet")).json())["status"] == "preparing":
            progress.append(status["prompts_prepared"])
            await asyncio.sleep(0.2)
        assert status["status"] == "ready" and status["label_count"] == 1000
        assert progress == sorted(progress) and len(set(progress)) >= 3, progress  # it rose, step by step
        by_name = await client.post("/classify", json={"images": [image], "classifier": "imagenet", "top_k": 5})
        labels = status["labels"]
        body = {"images": [image], "labels": labels, "templates": "imagenet", "top_k": 5}
        inline = await client.post("/classify", json=body)
        assert by_name.status_code == inline.status_code == 200
        assert by_name.json()["results"] == inline.json()["results"]


WORDS = {"blicket": ("circle", "red"), "dax": ("triangle", "blue"), "wug": ("square", "green")}


def _png_for(word: str, size: tuple[int, int]) -> bytes:
    shape, colour = WORDS[word]
    return shape_png(shape, colour, size)


async def test_few_shot_examples_teach_made_up_words_and_persist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Words the model never saw: zero-shot is a guess; two examples per word (multipart and JSON) make each
    fresh image rank its word first; weight 0 gives the zero-shot answer back; examples survive a restart."""
    settings = {"state_dir": tmp_path, "max_examples_per_label": 2}
    fresh = [b64(_png_for(word, (240, 180))) for word in WORDS]
    async with running_app(**settings) as (_, client):
        assert (await client.put("/v1/classifiers/words", json={"labels": list(WORDS)})).status_code == 202
        await _ready(client, "words")
        zero_shot = (await client.post("/classify", json={"images": fresh, "classifier": "words"})).json()
        guessed = [r["labels"][0]["label"] for r in zero_shot["results"]]
        assert guessed != list(WORDS), "zero-shot already knew the words: the test would prove nothing"
        for word in WORDS:
            files = [("image", (f"{word}.png", _png_for(word, (160, 120)), "image/png"))]
            added = await client.post("/v1/classifiers/words/examples", files=files, data={"label": word})
            assert added.status_code == 200, added.text
            body = {"label": word, "images": [b64(_png_for(word, (200, 200)))]}
            assert (await client.post("/v1/classifiers/words/examples", json=body)).status_code == 200
        status = await _ready(client, "words")
        assert status["examples_per_label"] == dict.fromkeys(WORDS, 2)
        taught = (await client.post("/classify", json={"images": fresh, "classifier": "words"})).json()
        assert [r["labels"][0]["label"] for r in taught["results"]] == list(WORDS)
        weightless = await client.post("/classify", json={"images": fresh, "classifier": "words", "examples_weight": 0})
        assert weightless.json()["results"] == zero_shot["results"]

        one_more = {"label": "dax", "images": [b64(_png_for("dax", (300, 100)))]}
        over = await client.post("/v1/classifiers/words/examples", json=one_more)
        assert over.status_code == 422 and over.json()["error"]["param"] == "images"
        unknown = await client.post("/v1/classifiers/words/examples", json={"label": "zorp", "images": fresh[:1]})
        assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "label"
        broken = {"label": "dax", "images": [b64(b"not an image")]}
        assert (await client.post("/v1/classifiers/words/examples", json=broken)).status_code in (415, 422)
        not_image = [("image", ("notes.txt", b"hello", "text/plain"))]
        refused = await client.post("/v1/classifiers/words/examples", files=not_image, data={"label": "dax"})
        assert refused.status_code == 415
        inline = await client.post("/classify", json={"images": fresh, "labels": ["a"], "examples_weight": 1})
        assert inline.status_code == 422 and inline.json()["error"]["param"] == "examples_weight"
    async with running_app(**settings) as (_, client):
        status = await _ready(client, "words")  # the example images re-embedded from the state directory
        assert status["examples_per_label"] == dict.fromkeys(WORDS, 2)
        again = (await client.post("/classify", json={"images": fresh, "classifier": "words"})).json()
        assert again["results"] == taught["results"]
        removed = await client.delete("/v1/classifiers/words/examples", params={"label": "dax"})
        assert removed.status_code == 200 and removed.json()["examples_per_label"] == {"blicket": 2, "wug": 2}
        cleared = await client.delete("/v1/classifiers/words/examples")
        assert cleared.json()["examples_per_label"] == {}
        back = (await client.post("/classify", json={"images": fresh, "classifier": "words"})).json()
        assert back["results"] == zero_shot["results"]


def test_upload_examples_sends_an_image_folder_with_progress(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CLI against a real server: the classifier is made from the folder names, every image is sent in
    batches, and a file the service refuses is reported without stopping the rest."""
    from typer.testing import CliRunner

    from service.cli import app as cli

    folder = tmp_path / "words"
    for word in WORDS:
        (folder / word).mkdir(parents=True)
        for i, size in enumerate([(120, 90), (200, 150), (260, 200)]):
            (folder / word / f"{i}.png").write_bytes(_png_for(word, size))
    (folder / "wug" / "broken.png").write_bytes(b"not a png")
    with live_server(state_dir=tmp_path / "state", max_examples_per_label=4) as (_, url):
        result = CliRunner().invoke(cli, ["upload-examples", str(folder), "-c", "words", "--url", url, "--batch", "2"])
        assert result.exit_code == 1, result.output  # one file was refused
        assert "sent 9 of 10 images" in result.output and "refused" in result.output and "broken.png" in result.output
        status = httpx.get(f"{url}/v1/classifiers/words").json()
        # the batch holding the broken file was refused as a whole, then sent again a file at a time
        assert status["labels"] == list(WORDS) and status["examples_per_label"] == dict.fromkeys(WORDS, 3)


async def test_a_classifier_deleted_while_preparing_stops_and_is_gone(gated) -> None:  # type: ignore[no-untyped-def]
    async with running_app(label_chunk_prompts=7, text_max_batch_size=7) as (app, client):
        engine = gated[-1]
        engine.gate.clear()  # the first slice's engine call waits
        assert (await client.put("/v1/classifiers/brief", json={"labels": LABELS})).status_code == 202
        assert (await client.delete("/v1/classifiers/brief")).status_code == 204
        calls = engine.calls
        engine.gate.set()
        assert (await client.get("/v1/classifiers/brief")).status_code == 404
        gone = await client.post("/classify", json={"images": [b64(shape_png())], "classifier": "brief"})
        assert gone.status_code == 404
        # the inline request below runs on the same text engine: the cancelled preparation adds nothing to it
        inline = await client.post("/classify", json={"images": [b64(shape_png())], "labels": ["one new label"]})
        assert inline.status_code == 200 and engine.calls <= calls + 1 + 1  # the call in flight, and the inline one
        assert app.state.metrics.value("clipserve_classifier_prompts", {"classifier": "brief", "kind": "total"}) == 0


async def test_an_example_over_the_size_limit_is_a_413(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with running_app(state_dir=tmp_path, max_example_mb=0.001) as (_, client):  # about 1 KB
        assert (await client.put("/v1/classifiers/small", json={"labels": ["dax"]})).status_code in (201, 202)
        big = {"label": "dax", "images": [b64(_png_for("dax", (400, 300)))]}
        response = await client.post("/v1/classifiers/small/examples", json=big)
        assert response.status_code == 413 and response.json()["error"]["param"] == "images[0]"


async def test_examples_added_while_the_labels_prepare_leave_it_ready(gated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A change that replaces a classifier mid-preparation must not leave it 'preparing' for ever (the new
    preparation once joined the old one's computation just as that was being cancelled)."""
    settings = {"state_dir": tmp_path, "label_chunk_prompts": 7, "text_max_batch_size": 7}
    async with running_app(**settings) as (_, client):
        engine = gated[-1]
        engine.gate.clear()
        engine.entered.clear()
        assert (await client.put("/v1/classifiers/words", json={"labels": list(WORDS)})).status_code == 202
        assert await asyncio.to_thread(engine.entered.wait, 60), "preparation never reached the engine"
        body = {"label": "dax", "images": [b64(_png_for("dax", (200, 200)))]}
        added = asyncio.create_task(client.post("/v1/classifiers/words/examples", json=body))
        engine.gate.set()
        assert (await added).status_code == 200
        status = await _ready(client, "words")
        assert status["examples_per_label"] == {"dax": 1}


async def test_concurrent_example_uploads_to_one_classifier_all_land(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with running_app(state_dir=tmp_path) as (_, client):
        assert (await client.put("/v1/classifiers/words", json={"labels": list(WORDS)})).status_code == 202
        await _ready(client, "words")
        uploads = [
            client.post("/v1/classifiers/words/examples", json={"label": word, "images": [b64(_png_for(word, size))]})
            for word in WORDS
            for size in ((150, 100), (210, 160))
        ]
        assert [r.status_code for r in await asyncio.gather(*uploads)] == [200] * 6
        status = await _ready(client, "words")
        assert status["examples_per_label"] == dict.fromkeys(WORDS, 2)
        stored = sorted(path.name for path in (tmp_path / "classifiers" / "words.examples").iterdir())
        assert len(stored) == 6  # every image referenced, none left over


@pytest.mark.parametrize("weight", ["1e309", "-1", "1000", "NaN"])
async def test_examples_weight_must_be_a_sane_number(weight: str) -> None:
    async with running_app() as (_, client):
        body = '{"images": ["x"], "classifier": "c", "examples_weight": ' + weight + "}"
        response = await client.post("/classify", content=body, headers={"content-type": "application/json"})
        assert response.status_code in (400, 422) and response.json()["error"]["code"] in (
            "invalid_input",
            "invalid_request",
        )
        files = [("image", ("a.png", shape_png(), "image/png"))]
        multipart = await client.post("/classify", files=files, data={"classifier": "c", "examples_weight": "inf"})
        assert multipart.status_code == 422 and multipart.json()["error"]["param"] == "examples_weight"


def _other_model(tmp_path) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    """A second model repository: the demo's graphs under another name and logit scale, so another content hash."""
    import json
    import shutil

    from models.demo.config import EXPORT_NAME, REPOSITORY_DIR

    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY_DIR / EXPORT_NAME, repository / "demo-rescaled")
    manifest_path = repository / "demo-rescaled" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"], manifest["logit_scale"] = "demo-rescaled", 30.0
    manifest_path.write_text(json.dumps(manifest))
    return repository, "demo-rescaled"


async def test_a_classifier_is_prepared_again_for_another_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Defined once, then served by int8 graphs and by another model: each prepares its own vectors by itself and
    answers as its inline labels do; the first model's slices stay, so going back encodes nothing."""
    image = b64(shape_png("triangle", "blue"))
    state = tmp_path / "state"
    repository, other = _other_model(tmp_path)
    by_name = {"images": [image], "classifier": "moving", "examples_weight": 0}
    inline = {"images": [image], "labels": LABELS}
    async with running_app(state_dir=state) as (_, client):
        assert (await client.put("/v1/classifiers/moving", json={"labels": LABELS})).status_code == 202
        fp32 = await _ready(client, "moving")
        example = {"label": LABELS[1], "images": [b64(shape_png("triangle", "blue", (120, 90)))]}
        assert (await client.post("/v1/classifiers/moving/examples", json=example)).status_code == 200
        fp32_answer = (await client.post("/classify", json=by_name)).json()["results"]
    for settings in ({"precision": "int8"}, {"model_repository": repository, "model": other}):
        async with running_app(state_dir=state, **settings) as (app, client):
            status = await _ready(client, "moving")
            assert engine_calls(app) > 0  # its own vectors, encoded by its own text engine
            assert engine_calls(app, "image") > 0  # and the example image embedded again
            assert status["examples_per_label"] == {LABELS[1]: 1}
            answer = (await client.post("/classify", json=by_name)).json()["results"]
            assert answer == (await client.post("/classify", json=inline)).json()["results"]
            assert answer != fp32_answer
            if "model" in settings:
                assert (status["model"], status["content_hash"]) != (fp32["model"], fp32["content_hash"])
    async with running_app(state_dir=state) as (app, client):
        await _ready(client, "moving")
        assert engine_calls(app) == 0  # the fp32 slices were kept beside the others'
        assert (await client.post("/classify", json=by_name)).json()["results"] == fp32_answer


async def test_a_preparation_cut_short_continues_from_redis(gated, redis_server) -> None:  # type: ignore[no-untyped-def]
    """With Redis, the finished chunks of a preparation that failed halfway are in Redis: another instance (or a
    restart) encodes only the rest."""
    labels = [f"thing {i}" for i in range(12)]
    settings = {"redis_url": redis_server.url, "label_chunk_prompts": 7, "text_max_batch_size": 7}
    async with running_app(**settings) as (_, client):
        engine = gated[-1]
        engine.failing_after = engine.calls + 5
        assert (await client.put("/v1/classifiers/half", json={"labels": labels})).status_code == 202
        status = await _settled(client, "half")
        assert status["status"] == "failed" and status["prompts_prepared"] == 5 * 7
    async with running_app(**settings) as (app, client):
        status = await _ready(client, "half")
        assert status["prompts_prepared"] == 12 * 7
        assert engine_calls(app) == 7  # only the chunks Redis did not have


async def test_classify_by_name_with_examples_is_the_documented_recipe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """By name, a classifier with examples answers exactly models.fewshot.prototypes computed from /embed's own
    vectors: the blended matrix for the scores, plus the per-label bias in the probabilities; a label without
    examples keeps its zero-shot vector."""
    from models.fewshot import prototypes

    examples = {
        LABELS[0]: [shape_png("circle", "red", (120, 90))],
        LABELS[1]: [shape_png("triangle", "blue", (90, 120)), shape_png("triangle", "blue", (150, 150))],
        LABELS[2]: [shape_png("square", "green", (100, 100))],
    }
    image = shape_png("hexagon", "yellow", (160, 120))
    async with running_app(state_dir=tmp_path) as (app, client):
        put = await client.put("/v1/classifiers/recipe", json={"labels": LABELS, "templates": "imagenet"})
        assert put.status_code in (201, 202)
        for label, pngs in examples.items():
            body = {"label": label, "images": [b64(png) for png in pngs]}
            assert (await client.post("/v1/classifiers/recipe/examples", json=body)).status_code == 200
        await _ready(client, "recipe")
        answer = await client.post("/classify", json={"images": [b64(image)], "classifier": "recipe"})
        assert answer.status_code == 200
        ranked = {item["label"]: item for item in answer.json()["results"][0]["labels"]}

        example_pngs = [png for pngs in examples.values() for png in pngs]
        body = {"images": [b64(png) for png in [image, *example_pngs]], "texts": LABELS, "templates": "imagenet"}
        embedded = (await client.post("/embed", json=body)).json()
        scoring = app.state.pipeline.model.scoring  # type: ignore[attr-defined]
    vectors = np.asarray(embedded["images"], np.float32)
    text = np.asarray(embedded["texts"], np.float32)
    labels = np.array([LABELS.index(label) for label, pngs in examples.items() for _ in pngs])
    expected = prototypes(text, vectors[1:], labels, scoring.logit_scale)
    cosines = vectors[:1] @ expected.matrix.T
    probabilities = scoring.probabilities(cosines, expected.bias)[0]
    assert expected.bias is not None and expected.bias[3] == 0 and np.abs(expected.bias).max() > 0
    np.testing.assert_allclose(expected.matrix[3], text[3], atol=1e-6)  # no examples: zero-shot vector
    for index, label in enumerate(LABELS):
        assert ranked[label]["score"] == pytest.approx(float(cosines[0, index]), abs=1e-5)
        assert ranked[label]["probability"] == pytest.approx(float(probabilities[index]), abs=1e-5)
