"""Model zoo: CLIP-family models from open_clip, local checkpoints, Hugging Face directories or the demo.

Every loader returns a `LoadedModel`: two towers (pixels -> embeddings, token ids -> embeddings), each one
`nn.Module` so that exporting a tower to ONNX is exporting one module, plus everything serving needs to
reproduce the model's inputs and scores (preprocessing, tokenizer spec, logit scale/bias, activation) and a
`source` record of what was loaded.

Only models whose text side uses CLIP's BPE tokenizer (49,408 tokens, start 49406, end 49407) are accepted,
because that is the only tokenizer the torch-free service implements (models/tokenizer.py). Models with
another tokenizer (SigLIP's SentencePiece, XLM-R, ...) raise `UnsupportedModelError` at load time rather
than loading fine and then producing wrong token ids in serving. Likewise for preprocessing that
`PreprocessConfig` cannot express (non-square inputs, "longest" resize, resize-then-crop at two sizes).

Loading never downloads anything unless the caller names a remote source: `load_open_clip` with a
pretrained tag or an `hf-hub:` architecture. Torch lives here and in models/demo/, never in the torch-free
modules; open_clip and transformers are imported inside the loaders that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.manifest import sha256_file
from models.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from models.scoring import Scoring
from models.tokenizer import VOCAB_SIZE, ClipTokenizer, TokenizerSpec

Activation = Literal["softmax", "sigmoid"]

CLIP_BPE = TokenizerSpec()  # the ids and vocabulary our tokenizer produces; models must agree with them
# PIL resampling codes as transformers stores them in preprocessor_config.json.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_HF_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


class UnsupportedModelError(NotImplementedError):
    """The model exists, but its tokenizer or preprocessing is one this project does not reproduce."""


class _Tower(nn.Module):
    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        # The whole model is registered (not just the sub-tower) because encode_text of an open_clip CLIP
        # reads embeddings, mask and projection from the top-level module; the exporter traces only the
        # parameters the method touches.
        self.model = model
        self.method = method

    def _encode(self, inputs: torch.Tensor) -> torch.Tensor:
        features = _features(getattr(self.model, self.method)(inputs))
        # Normalise in float32 so that half-precision features still give unit-norm float32 embeddings.
        return F.normalize(features.float(), dim=-1)


class ImageTower(_Tower):
    """Float pixels [B, 3, H, W] -> L2-normalised float32 embeddings [B, D]."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode(pixels)


class TextTower(_Tower):
    """int64 token ids [B, L] -> L2-normalised float32 embeddings [B, D]."""

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._encode(token_ids)


def _features(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected
    # features; transformers 4 and open_clip return the tensor itself.
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"cannot find embeddings in a {type(output).__name__}")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    name: str
    image_tower: ImageTower
    text_tower: TextTower
    preprocess: PreprocessConfig
    tokenizer: TokenizerSpec
    embed_dim: int
    logit_scale: float  # the multiplier itself (exp of the stored parameter)
    logit_bias: float | None
    activation: Activation
    source: dict[str, Any]

    @property
    def scoring(self) -> Scoring:
        """How this model turns cosines into probabilities: the one recipe (models/scoring.py) that serving uses."""
        return Scoring(self.logit_scale, self.logit_bias, self.activation)

    def numpy_encoders(self, tokenizer: ClipTokenizer) -> tuple[Callable, Callable]:
        """(pixels [B,3,H,W] -> [B,D], texts -> [B,D]) as numpy functions, for torch-free callers."""

        @torch.inference_mode()
        def encode_images(pixels: np.ndarray) -> np.ndarray:
            return self.image_tower(torch.from_numpy(pixels)).numpy()

        @torch.inference_mode()
        def encode_texts(texts: list[str]) -> np.ndarray:
            return self.text_tower(torch.from_numpy(tokenizer(texts, self.tokenizer.context_length))).numpy()

        return encode_images, encode_texts


def _assemble(
    name: str,
    model: nn.Module,
    methods: tuple[str, str],
    preprocess: PreprocessConfig,
    tokenizer: TokenizerSpec,
    source: dict[str, Any],
) -> LoadedModel:
    # Inference only: without gradients, calling a tower outside no_grad/inference_mode records no graph.
    model = model.eval().requires_grad_(False)
    image_tower, text_tower = ImageTower(model, methods[0]).eval(), TextTower(model, methods[1]).eval()
    scale = float(model.logit_scale.detach().exp().item())
    bias = getattr(model, "logit_bias", None)
    bias = None if bias is None else float(bias.detach().item())
    return LoadedModel(
        name=name,
        image_tower=image_tower,
        text_tower=text_tower,
        preprocess=preprocess,
        tokenizer=tokenizer,
        embed_dim=_probe_embed_dim(text_tower, tokenizer),
        logit_scale=scale,
        logit_bias=bias,
        activation="softmax" if bias is None else "sigmoid",
        source=source,
    )


def _probe_embed_dim(text_tower: TextTower, spec: TokenizerSpec) -> int:
    # One tiny forward pass is the only way that works for every architecture (no common attribute).
    ids = torch.full((1, spec.context_length), spec.pad_token_id, dtype=torch.long)
    ids[0, 0], ids[0, 1] = spec.sot_token_id, spec.eot_token_id
    with torch.inference_mode():
        return int(text_tower(ids).shape[-1])


def _require_clip_bpe(spec: TokenizerSpec, what: str) -> TokenizerSpec:
    same = (spec.sot_token_id, spec.eot_token_id, spec.vocab_size) == (
        CLIP_BPE.sot_token_id,
        CLIP_BPE.eot_token_id,
        CLIP_BPE.vocab_size,
    )
    if not same:
        raise UnsupportedModelError(
            f"{what}: vocabulary {spec.vocab_size}, start/end ids {spec.sot_token_id}/{spec.eot_token_id}; only "
            f"CLIP-BPE models ({VOCAB_SIZE} tokens, {CLIP_BPE.sot_token_id}/{CLIP_BPE.eot_token_id}) are supported"
        )
    return spec


def _square(size: Any, what: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise UnsupportedModelError(f"{what}: input size {size!r} is not square; PreprocessConfig is square only")


def _preprocess(size: Any, mean: Any, std: Any, interpolation: str, resize_mode: str, what: str) -> PreprocessConfig:
    # open_clip's "random" interpolation is a training option; its eval transform uses bicubic for it.
    interpolation = "bicubic" if interpolation == "random" else interpolation
    if interpolation not in ("bicubic", "bilinear", "nearest") or resize_mode not in ("shortest", "squash"):
        raise UnsupportedModelError(f"{what}: interpolation {interpolation!r} / resize {resize_mode!r} unsupported")
    return PreprocessConfig(
        image_size=_square(size, what),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=interpolation,  # type: ignore[arg-type]
        resize_mode=resize_mode,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------- open_clip


def _check_open_clip_text(architecture: str) -> None:
    import open_clip

    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {architecture!r}; see open_clip.list_models()")
    text_cfg = config.get("text_cfg", {})
    # Mirrors open_clip.get_tokenizer: an HF tokenizer name, or "siglip" in a plain name, means a non-BPE
    # tokenizer; tokenizer_kwargs change text cleaning, which would silently change the ids.
    hf_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    siglip_name = "siglip" in architecture.lower() and not architecture.startswith(_SCHEMA_PREFIXES)
    if hf_name or siglip_name or text_cfg.get("tokenizer_kwargs"):
        raise UnsupportedModelError(
            f"open_clip architecture {architecture!r} uses a non-CLIP tokenizer ({hf_name or 'SigLIP'}); "
            "only models with CLIP's BPE tokenizer are supported for now"
        )


def _open_clip_preprocess(model: nn.Module, what: str) -> PreprocessConfig:
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})  # set by create_model, absent on bare models
    return _preprocess(
        cfg.get("size", getattr(visual, "image_size", None)),
        cfg.get("mean", OPENAI_MEAN),
        cfg.get("std", OPENAI_STD),
        cfg.get("interpolation", "bicubic"),
        cfg.get("resize_mode", "shortest"),
        what,
    )


def _open_clip_tokenizer(model: nn.Module, what: str, context_length: int | None = None) -> TokenizerSpec:
    # open_clip's SimpleTokenizer pads with 0 whatever the model's text_cfg.pad_id says.
    spec = TokenizerSpec(
        context_length=int(context_length or model.context_length),
        vocab_size=int(model.vocab_size),
    )
    return _require_clip_bpe(spec, what)


def _from_open_clip(model: nn.Module, name: str, source: dict[str, Any], **overrides: Any) -> LoadedModel:
    import open_clip

    source = {**source, "model_class": type(model).__name__, "open_clip_version": open_clip.__version__}
    preprocess = overrides.get("preprocess") or _open_clip_preprocess(model, name)
    tokenizer = _open_clip_tokenizer(model, name, overrides.get("context_length"))
    return _assemble(name, model, ("encode_image", "encode_text"), preprocess, tokenizer, source)


def register_open_clip_config(path: str | Path) -> str:
    """Makes a custom open_clip model config (JSON file, named by its stem) loadable by architecture name."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} does not exist")
    open_clip.add_model_config(path)
    return path.stem


def load_open_clip(architecture: str, pretrained: str | None = None, *, cache_dir: str | None = None) -> LoadedModel:
    """Any open_clip architecture; `pretrained` is a tag (downloads), a local file, or None for random init."""
    import open_clip

    # A known tag wins over a same-named file, as in open_clip's own lookup.
    is_tag = pretrained is not None and bool(open_clip.get_pretrained_cfg(architecture, pretrained))
    if pretrained is not None and not is_tag and Path(pretrained).is_file():
        return load_open_clip_checkpoint(pretrained, architecture)
    _check_open_clip_text(architecture)
    model = open_clip.create_model(architecture, pretrained=pretrained, cache_dir=cache_dir)
    source: dict[str, Any] = {"kind": "open_clip", "architecture": architecture, "pretrained": pretrained}
    if pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
        source["weights"] = {k: tag_cfg[k] for k in ("hf_hub", "url") if tag_cfg.get(k)}
    name = f"{architecture}:{pretrained}" if pretrained else architecture
    return _from_open_clip(model, name, source)


def load_open_clip_checkpoint(path: str | Path, architecture: str) -> LoadedModel:
    """A local open_clip state dict (torch.save or .safetensors) for `architecture`; its sha256 is recorded."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
    _check_open_clip_text(architecture)
    digest = sha256_file(path)
    # Passing the file as `pretrained` reuses open_clip's loader: it unwraps {"state_dict": ...} and "module."
    # prefixes, reads .safetensors by suffix, reshapes logit_scale/bias, and loads strictly.
    model = open_clip.create_model(architecture, pretrained=str(path))
    source = {"kind": "open_clip_checkpoint", "architecture": architecture, "path": str(path.resolve())}
    return _from_open_clip(model, f"{architecture}:{path.name}", {**source, "sha256": digest})


# -------------------------------------------------------------------------------------------- Hugging Face


def _hf_tokenizer(text_config: Any) -> TokenizerSpec:
    bos, eos = text_config.bos_token_id, text_config.eos_token_id
    if eos == 2:
        # Configs written before transformers PR #24773 (e.g. openai/clip-vit-*) carry placeholder ids
        # (bos 0, eos 2, pad 1); transformers then pools at argmax(ids), i.e. at CLIP's end token.
        bos, eos = CLIP_BPE.sot_token_id, CLIP_BPE.eot_token_id
    # pad_token_id is ignored: pads follow the end token, which a causal text tower pools at, so they
    # never change an embedding; 0 keeps our ids identical to open_clip's for the same text.
    spec = TokenizerSpec(
        context_length=int(text_config.max_position_embeddings),
        sot_token_id=bos,
        eot_token_id=eos,
        pad_token_id=0,
        vocab_size=int(text_config.vocab_size),
    )
    return _require_clip_bpe(spec, "Hugging Face text_config")


def _hf_square_size(value: Any, what: str) -> tuple[int, str]:
    # transformers writes sizes as an int (old files), {"shortest_edge": n} or {"height": h, "width": w}.
    if isinstance(value, int):
        return value, "shortest"
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"]), "shortest"
    if isinstance(value, dict) and "height" in value:
        return _square((value["height"], value.get("width")), what), "squash"
    raise UnsupportedModelError(f"{what}: cannot read size {value!r}")


def _hf_preprocess(directory: Path, vision_image_size: Any) -> tuple[PreprocessConfig, str]:
    path = directory / "preprocessor_config.json"
    if not path.is_file():  # no processor saved: CLIP's defaults at the vision tower's resolution
        defaults = _preprocess(vision_image_size, OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest", str(directory))
        return defaults, "defaults"
    cfg = json.loads(path.read_text())
    what = str(path)
    if not cfg.get("do_resize", True) or not cfg.get("do_rescale", True):
        raise UnsupportedModelError(f"{what}: preprocessing without resize or 1/255 rescale is not supported")
    size, mode = _hf_square_size(cfg.get("size", vision_image_size), what)
    if cfg.get("do_center_crop", True):
        crop, _ = _hf_square_size(cfg.get("crop_size", size), what)
        if crop != size:
            raise UnsupportedModelError(f"{what}: resize to {size} then crop to {crop} is not supported")
    elif mode == "shortest":
        raise UnsupportedModelError(f"{what}: shortest-edge resize without centre crop gives non-square inputs")
    resample = cfg.get("resample", 3)
    interpolation = _PIL_RESAMPLE.get(resample, resample) if isinstance(resample, int) else str(resample).lower()
    normalise = cfg.get("do_normalize", True)
    mean = cfg.get("image_mean", OPENAI_MEAN) if normalise else (0.0, 0.0, 0.0)
    std = cfg.get("image_std", OPENAI_STD) if normalise else (1.0, 1.0, 1.0)
    return _preprocess(size, mean, std, str(interpolation), mode, what), path.name


def _hf_weight_hashes(directory: Path) -> dict[str, str]:
    files = sorted({p for pattern in _HF_WEIGHT_PATTERNS for p in directory.glob(pattern)})
    return {p.name: sha256_file(p) for p in files}


def load_hf_clip(directory: str | Path) -> LoadedModel:
    """A transformers CLIPModel directory (save_pretrained output), read with local files only."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected CLIPModel.save_pretrained output")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise UnsupportedModelError(f"{directory}: model_type {model_type!r}; only 'clip' (CLIPModel) is supported")
    # Config first: tokenizer and preprocessing errors surface before the weights are read.
    config = CLIPConfig.from_pretrained(directory, local_files_only=True)
    tokenizer = _hf_tokenizer(config.text_config)
    preprocess, preprocess_from = _hf_preprocess(directory, config.vision_config.image_size)
    if preprocess.image_size != _square(config.vision_config.image_size, "vision_config.image_size"):
        raise ValueError(f"{directory}: preprocessing size {preprocess.image_size} differs from the vision tower's")
    # transformers 5 loads in the checkpoint's own dtype by default; our embeddings contract is float32.
    model = CLIPModel.from_pretrained(directory, config=config, local_files_only=True).float()
    source = {
        "kind": "hf_clip",
        "directory": str(directory.resolve()),
        "model_class": type(model).__name__,
        "weights": _hf_weight_hashes(directory),
        "preprocess_from": preprocess_from,
        "transformers_version": transformers.__version__,
    }
    methods = ("get_image_features", "get_text_features")
    return _assemble(directory.resolve().name, model, methods, preprocess, tokenizer, source)


# ---------------------------------------------------------------------------------------------------- demo


def load_demo(directory: str | Path | None = None) -> LoadedModel:
    """The built-in demo model (models/demo/artifacts unless `directory` says otherwise)."""
    from models.demo import checkpoint
    from models.demo.config import ARTIFACTS_DIR, CARD_FILE, WEIGHTS_FILE

    directory = Path(directory) if directory is not None else ARTIFACTS_DIR
    weights = directory / WEIGHTS_FILE
    for required in (weights, directory / CARD_FILE):
        if not required.is_file():
            raise FileNotFoundError(f"demo model file {required} is missing; train it first (clipserve train-demo)")
    card = checkpoint.read_card(directory)
    model = checkpoint.load(directory)
    if int(card["context_length"]) != model.context_length:
        raise ValueError(f"demo card context_length {card['context_length']} != model's {model.context_length}")
    source = {
        "kind": "demo",
        "architecture": card["model_config"],
        "path": str(weights.resolve()),
        "sha256": sha256_file(weights),
    }
    overrides = {"preprocess": PreprocessConfig.from_dict(card["preprocess"]), "context_length": card["context_length"]}
    return _from_open_clip(model, card.get("name", "clipserve-demo"), source, **overrides)


# ------------------------------------------------------------------------------------------------ dispatch


def load_model(reference: str) -> LoadedModel:
    """Loads from one string, for CLIs and config files.

    `demo` | `demo:DIR` | `open_clip:ARCH` (random init) | `open_clip:ARCH@TAG` | `open_clip:ARCH@FILE`
    | `hf:DIR`. ARCH may itself carry open_clip's `hf-hub:` or `local-dir:` schema.
    """
    kind, _, rest = reference.partition(":")
    if kind == "demo":
        return load_demo(rest or None)
    if kind == "open_clip" and rest:
        # Split at the first '@': architecture names never contain one, file paths might.
        architecture, _, pretrained = rest.partition("@")
        return load_open_clip(architecture, pretrained or None)
    if kind == "hf" and rest:
        return load_hf_clip(rest)
    raise ValueError(f"cannot parse model reference {reference!r}; expected demo, open_clip:ARCH[@TAG|@FILE] or hf:DIR")
