"""Contrastive pre-training of the demo model from scratch, as the CLIP paper describes (§2.3, Fig. 3).

Image and text towers embed a batch of N (image, caption) pairs; the loss is the symmetric cross-entropy
over the N x N cosine-similarity matrix scaled by a learned temperature (clipped at 100). One deviation:
with only 40 colour/shape compositions a batch of 128 repeats captions, so a caption that describes
another image in the batch just as well ("a red circle" for two red circles) counts as a positive for it
(the target row is spread over all matching captions) instead of a false negative. With one caption per
image this is exactly the paper's loss. Augmentation is simple: flips, quarter turns, small shifts, and
random distractor words in captions, so that unfamiliar template words ("a tattoo of the {}.") are ignored.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.demo import checkpoint, shapes
from models.demo.config import ARTIFACTS_DIR, CONTEXT_LENGTH, MODEL_CONFIG, PREPROCESS
from models.demo.dataset import ImagePool, make_pool
from models.preprocess import ImageTransform, PreprocessConfig
from models.tokenizer import ClipTokenizer, TokenizerSpec, open_clip_tokenizer_json, vocabulary_words

# Words that name what the captions are about must never be inserted as noise.
_RESERVED_WORDS = {
    *shapes.COLOURS,
    *shapes.SHAPES,
    "small",
    "large",
    "light",
    "dark",
    "grey",
    "gray",
    "colourful",
    "colorful",
    "background",
    "circles",
    "squares",
    "triangles",
    "stars",
    "hexagons",
    "round",
    "rectangle",
    "pentagon",
    "octagon",
    "violet",
    "crimson",
    "scarlet",
    "gold",
    "golden",
    "navy",
    "pink",
    "brown",
    "cyan",
    "magenta",
    "lime",
}


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 128
    pool_size: int = 60_000
    learning_rate: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    distractor_probability: float = 0.3
    max_logit_scale: float = 100.0
    threads: int = 2
    workers: int = 2


def _learning_rate(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # As in the paper: no weight decay on gains, biases and the temperature.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "logit_scale" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.98), eps=1e-6)


def _augment(rng: np.random.Generator, pixels: np.ndarray, shift: int = 4) -> np.ndarray:
    out = np.empty_like(pixels)
    padded = np.pad(pixels, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    size = pixels.shape[1]
    for i in range(len(pixels)):
        dy, dx = rng.integers(0, 2 * shift + 1, 2)
        image = padded[i, dy : dy + size, dx : dx + size]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        out[i] = np.rot90(image, int(rng.integers(4)))
    return out


def _with_distractors(rng: np.random.Generator, text: str, words: list[str], probability: float) -> str:
    if rng.random() >= probability:
        return text
    tokens = text.split(" ")
    for _ in range(int(rng.integers(1, 3))):
        tokens.insert(int(rng.integers(len(tokens) + 1)), words[int(rng.integers(len(words)))])
    return " ".join(tokens)


def contrastive_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor, matches: torch.Tensor
) -> torch.Tensor:
    """Symmetric cross-entropy; `matches[i, j]` says caption j describes image i (diagonal always true)."""
    logits = logit_scale * image_embeddings @ text_embeddings.T
    image_targets = matches / matches.sum(dim=1, keepdim=True)
    text_targets = matches.T / matches.T.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.T, text_targets)) / 2


def train(recipe: Recipe = Recipe(), output: Path = ARTIFACTS_DIR) -> dict:
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = np.random.default_rng([recipe.seed, 2**31])  # batch sampling; the pool has its own streams

    started = time.perf_counter()
    with tqdm(total=recipe.pool_size, desc="rendering images", unit="img") as bar:
        pool: ImagePool = make_pool(recipe.pool_size, recipe.seed, workers=recipe.workers, progress=bar.update)
    pool_seconds = time.perf_counter() - started

    tokenizer_json = open_clip_tokenizer_json()
    tokenizer = ClipTokenizer.from_json(tokenizer_json, TokenizerSpec(context_length=CONTEXT_LENGTH))
    words = [w for w in vocabulary_words(tokenizer_json) if w not in _RESERVED_WORDS and len(w) > 1]
    transform = ImageTransform(PreprocessConfig.from_dict(PREPROCESS))

    model = checkpoint.build_model(MODEL_CONFIG).train()
    optimizer = _optimizer(model, recipe)
    history = []
    bar = tqdm(range(recipe.steps), desc="training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        index = rng.integers(0, len(pool.attributes), recipe.batch_size)
        attributes = [pool.attributes[i] for i in index]
        captions = [shapes.caption(rng, a) for a in attributes]
        texts = [_with_distractors(rng, c.text, words, recipe.distractor_probability) for c in captions]
        matches = torch.tensor([[c.matches(a) for c in captions] for a in attributes], dtype=torch.float32)
        images = torch.from_numpy(transform.normalise(_augment(rng, pool.pixels[index])))
        tokens = torch.from_numpy(tokenizer(texts))

        image_embeddings, text_embeddings, logit_scale = model(images, tokens)
        loss = contrastive_loss(image_embeddings, text_embeddings, logit_scale, matches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(recipe.max_logit_scale))
            hits = matches[torch.arange(len(index)), (image_embeddings @ text_embeddings.T).argmax(1)]
        if step % 10 == 0 or step == recipe.steps - 1:
            record = {"step": step, "loss": round(loss.item(), 4), "batch_top1": round(hits.mean().item(), 4)}
            history.append(record)
            bar.set_postfix(loss=record["loss"], top1=record["batch_top1"], scale=round(logit_scale.item(), 1))
    total_seconds = time.perf_counter() - started

    card = {
        "name": "clipserve-demo",
        "description": "Tiny CLIP trained from scratch on synthetic coloured shapes (built-in demo model).",
        "model_config": MODEL_CONFIG,
        "preprocess": PREPROCESS,
        "context_length": CONTEXT_LENGTH,
        "held_out_compositions": sorted(f"{c} {s}" for c, s in shapes.HELD_OUT),
        "recipe": asdict(recipe),
        "reproduce": f"clipserve train-demo --seed {recipe.seed} --steps {recipe.steps}",
        "training": {
            "render_seconds": round(pool_seconds, 1),
            "total_seconds": round(total_seconds, 1),
            "final": history[-1],
            "history": history,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
    }
    checkpoint.save(model.eval(), card, output)
    return card
