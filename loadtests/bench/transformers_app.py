"""The baseline a user would otherwise hand-roll: transformers' zero-shot pipeline behind a FastAPI endpoint.

This is what `make bench` compares clipserve against, not something to deploy. It is written the way a typical
user writes it, not tuned: `transformers.pipeline("zero-shot-image-classification")` built once at startup, a
plain `def` endpoint that FastAPI runs in its threadpool, no batching across requests, no label cache (every
request encodes its labels again, once per image), torch's default thread count unless --threads says otherwise.

The model is a random-init CLIP ViT-B/32 built from a `transformers.CLIPConfig` (nothing is downloaded): the same
architecture as the random-init ViT-B-32 export that clipserve is benchmarked on, so timings compare like with
like, but the weights are random and the probabilities mean nothing. The tokenizer is transformers'
`CLIPTokenizer` over CLIP's vocabulary and merges, read from the tokenizer.json the repository ships with the demo
model; the image processor is `CLIPImageProcessor` with CLIP's defaults (shortest edge 224, centre crop 224, CLIP's
mean and std).

It takes the body clipserve's benchmark sends, `{"images": [<base64 JPEG>, ...], "labels": [...], "templates":
["a photo of a {}."]}` (templates optional; the pipeline takes one template, the first), and answers
`{"results": [{"labels": [{"label": ..., "probability": ...}, ...]}]}`, labels sorted high to low.

    python -m loadtests.bench.transformers_app --port 8001 [--host 127.0.0.1] [--threads 2]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR

TOKENIZER_FILE = REPOSITORY_DIR / EXPORT_NAME / "tokenizer.json"  # CLIP's vocabulary, as the tokenizers library
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"  # ids 49406, 49407 (see the manifest)
DEFAULT_TEMPLATE = "a photo of a {}."


def vit_b_32_config() -> Any:
    """CLIP ViT-B/32's sizes as a transformers CLIPConfig (what openai/clip-vit-base-patch32 declares)."""
    import transformers

    return transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        vision_config={
            "image_size": 224,
            "patch_size": 32,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        projection_dim=512,
    )


def build_tokenizer(path: Path = TOKENIZER_FILE, max_length: int = 77) -> Any:
    """transformers' CLIPTokenizer (lower-casing, start/end tokens, padded with the end token as HF's CLIP is) over
    the vocabulary and merges of `path`. The file alone has no normaliser and adds no start/end tokens."""
    import transformers

    bpe = json.loads(path.read_text())["model"]
    return transformers.CLIPTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],  # type: ignore[misc]  # pairs, though typed as str
        bos_token=START_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=max_length,
    )


def build_pipeline(config: Any = None, *, seed: int = 0) -> Any:
    """The zero-shot pipeline around a random-init CLIPModel of `config` (ViT-B/32's sizes by default)."""
    import torch
    import transformers

    config = config if config is not None else vit_b_32_config()
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    size = config.vision_config.image_size
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    tokenizer = build_tokenizer(max_length=config.text_config.max_position_embeddings)
    return transformers.pipeline(
        "zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=image_processor
    )


class ClassifyRequest(BaseModel):
    images: list[str] = Field(min_length=1)  # base64-encoded image files
    labels: list[str] = Field(min_length=1)
    templates: list[str] | str | None = None


def decode_image(data: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise HTTPException(400, f"not a base64-encoded image: {error}") from error
    return image


def hypothesis_template(templates: list[str] | str | None) -> str:
    """The first template; the pipeline takes exactly one. clipserve's preset names ("simple") are not known here."""
    if not templates:
        return DEFAULT_TEMPLATE
    template = templates if isinstance(templates, str) else templates[0]
    if "{}" not in template:
        raise HTTPException(422, f"templates: {template!r} is not a template with '{{}}' (presets are not supported)")
    return template


def create_app(config: Any = None) -> FastAPI:
    """The app; the model (random-init CLIP of `config`, ViT-B/32 by default) is built at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = time.perf_counter()
        classifier = build_pipeline(config)
        classifier(Image.new("RGB", (64, 64)), candidate_labels=["a", "b"])  # the first call pays for set-up
        app.state.build_s = time.perf_counter() - start
        app.state.classifier = classifier
        print(f"transformers_app: model built and warmed in {app.state.build_s:.1f} s", file=sys.stderr, flush=True)
        yield

    app = FastAPI(title="transformers zero-shot baseline", lifespan=lifespan)
    app.state.classifier = None

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if app.state.classifier is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "build_s": app.state.build_s})

    @app.post("/classify")
    def classify(request: ClassifyRequest) -> dict[str, Any]:
        template = hypothesis_template(request.templates)
        images = [decode_image(data) for data in request.images]
        outputs = app.state.classifier(images, candidate_labels=request.labels, hypothesis_template=template)
        return {
            "results": [
                {"labels": [{"label": o["label"], "probability": o["score"]} for o in output]} for output in outputs
            ]
        }

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
