"""Every knob of the service, in one `Settings` object built once from `CLIPSERVE_*` environment variables.

The public names are short and flat (`CLIPSERVE_MAX_BATCH_SIZE`, `CLIPSERVE_REDIS_URL`, ...) and listed in
the README. Unset model settings mean the built-in demo model, so a fresh install serves something with no
GPU, no Redis and no network. The variables the export commands read too (which model, the batch size, the
TensorRT precision) are defined once, in `models.settings.SharedSettings`, which `Settings` extends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from models.settings import SharedSettings
from models.templates import PRESETS, SERVING_PRESET

EngineKind = Literal["onnxruntime", "tensorrt", "torch", "openvino"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]


class Settings(SharedSettings):
    # The configuration (env prefix, empty means unset, frozen) and the shared variables come from SharedSettings.
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")

    # --- model (model_repository, model, tensorrt_precision: SharedSettings) -------------------------------------
    engine: EngineKind = Field("onnxruntime", description="Runtime for both encoders.")
    precision: Precision = Field(
        "fp32",
        description="Which exported graphs to run; for the torch engine, what it computes in (fp16, bf16 on GPU).",
    )
    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="ONNX Runtime providers in order of preference; empty: best installed."
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime or OpenVINO threads per session; 0: its default.")
    intra_op_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's threads spin for work between runs (its own default). Off: they share the "
        "cores with request handling, which spinning starves; on may pay on a node with cores to spare.",
    )
    openvino_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="What CLIPSERVE_ENGINE=openvino computes the fp32 graphs in: f32, or bf16 (about twice as fast on "
        "CPUs with AVX-512 BF16 or AMX; refused elsewhere) behind a parity gate at startup.",
    )
    torch_cuda_graphs: bool = Field(
        True, description="The torch engine on a GPU replays CUDA graphs captured per batch-size bucket."
    )
    torch_model: str | None = Field(
        None, description="models.zoo reference for the torch engine when the manifest cannot name its weights."
    )

    # --- GPU path ----------------------------------------------------------------------------------------------
    similarity: Literal["auto", "numpy", "cuda"] = Field(
        "auto",
        description="Scoring: the CUDA kernel on embeddings left on the GPU, or numpy on the host; auto: the "
        "kernel when the image engine keeps embeddings on a GPU and the kernel loads.",
    )
    cuda_kernels: Path | None = Field(
        None, description="The similarity kernel's fatbin; unset: the one `make kernels` builds into the package."
    )
    gpu_label_cache_mb: float = Field(512.0, ge=0, description="Label matrices kept on the GPU, in MiB.")
    gpu_gemm: Literal["auto", "cublas", "kernel"] = Field(
        "auto",
        description="The cosine GEMM before the fused softmax + top-k kernel: cuBLAS, the kernel's own tensor-core "
        "GEMM, or auto: cuBLAS when libcublas loads.",
    )
    gpu_label_residuals: bool = Field(
        True,
        description="fp16/bf16 embeddings are scored against the labels at about fp32 accuracy (rounded values plus "
        "what the rounding lost); false: against the rounded labels alone, half the GEMM work.",
    )
    preprocess_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Decode and resize images on the CPU (exact, the default) or on the GPU (nvJPEG)."
    )

    # --- batching (max_batch_size: SharedSettings) ---------------------------------------------------------------
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="Longest images queued together wait for more to join their batch; a lone one goes at once.",
    )
    max_queue: int = Field(512, ge=1, description="Images waiting for the engine before requests get 503.")
    text_max_batch_size: int = Field(256, ge=1, description="Most prompts per text-engine call.")
    text_max_wait_ms: float = Field(2.0, ge=0, description="Longest a prompt waits for others to join.")
    background_batch_size: int = Field(
        32,
        ge=1,
        description="Prompts per text-engine call for background work (preparing saved classifiers): a live "
        "request waits for at most one such call.",
    )
    text_max_queue: int = Field(16384, ge=1, description="Prompts waiting for the text engine before 503.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of one request; 504 when missed.")

    # --- label cache -------------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis for the shared label cache; unset: memory only.")
    redis_timeout_ms: float = Field(100.0, gt=0, description="Socket timeout of each Redis call.")
    cache_ttl_s: int | None = Field(None, ge=1, description="Expiry of label vectors in Redis; unset: none.")
    cache_memory_mb: float = Field(64.0, ge=0, description="In-process LRU of label vectors, in MiB.")
    label_chunk_prompts: int = Field(
        1024,
        ge=1,
        description="Prompts encoded and cached together when label vectors are computed: work cut short (a "
        "deadline, a restart) keeps every finished chunk, and live requests get in between chunks.",
    )
    state_dir: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "clipserve"
        ),
        description="Without Redis, saved classifiers (definitions and prepared vectors) live here, so a restart "
        "keeps them; with CLIPSERVE_REDIS_URL they live in Redis.",
    )
    max_classifier_labels: int = Field(100_000, ge=1, description="Most labels in one saved classifier.")
    max_examples_per_label: int = Field(16, ge=1, description="Most few-shot example images per classifier label.")
    max_example_mb: float = Field(4.0, gt=0, description="Largest few-shot example image file, in MiB.")
    default_templates: str = Field(SERVING_PRESET, description="Template preset when a request names none.")

    # --- limits ------------------------------------------------------------------------------------------------
    max_body_mb: float = Field(20.0, gt=0, description="Largest request body.")
    body_linger_mb: float = Field(
        64.0,
        ge=0,
        description="After a 413, the most of the rest of an oversized body read and thrown away before closing "
        "(nginx's lingering close), so that clients which send the whole body first can read the answer.",
    )
    body_linger_s: float = Field(5.0, ge=0, description="The longest that discarding after a 413 may take.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest decoded image, in pixels.")
    max_images: int = Field(32, ge=1, description="Most images in one request.")
    max_labels: int = Field(1000, ge=1, description="Most labels in one request.")
    max_label_chars: int = Field(300, ge=1, description="Longest label.")
    max_texts: int = Field(1024, ge=1, description="Most texts in one /embed request.")
    max_text_chars: int = Field(2000, ge=1, description="Longest text in /embed and /v1/embeddings.")
    max_prompts: int = Field(
        100_000,
        ge=1,
        description="Most labels x templates in one request (1,000 labels x the 80 ImageNet templates fit).",
    )

    # --- access ------------------------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API keys (comma-separated); empty: no authentication."
    )
    playground: bool = Field(False, description="Serve the playground page at / for trying the API in a browser.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (comma-separated, or *); empty: CORS off.",
    )

    # --- operations --------------------------------------------------------------------------------------------
    shutdown_grace_s: float = Field(
        20.0,
        gt=0,
        description="On SIGTERM: /readyz turns 503 and new requests get 503 at once, accepted ones finish; the "
        "process exits within this many seconds.",
    )
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests being served at once before new ones get 503 with Retry-After."
    )
    redis_probe_interval_s: float = Field(
        0.5, gt=0, description="While Redis is unreachable, how often a background probe checks whether it is back."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object each.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")

    @field_validator("default_templates")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        # Checked here, at startup: otherwise the first request without templates would get a 422 for it.
        if value not in PRESETS:
            raise ValueError(f"unknown template preset {value!r}; presets: {', '.join(PRESETS)}")
        return value

    @field_validator("api_keys", "onnx_providers", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
