"""`clipserve train-demo` and `clipserve eval-demo`: the built-in demo model's commands.

Registered into the `clipserve` CLI through the `clipserve.commands` entry point; torch is imported
inside the commands only, so `clipserve --help` and `clipserve serve` stay torch-free.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from models.demo.config import ARTIFACTS_DIR
from models.extras import needs_extras

REPORT_PATH = Path(__file__).parent / "demo" / "REPORT.md"
FEWSHOT_REPORT_PATH = Path(__file__).parent / "demo" / "FEWSHOT.md"


@needs_extras("train-demo", "cpu", "export")
def train_demo(
    seed: int = typer.Option(0, help="Seed for rendering, initialisation and batch order."),
    steps: int = typer.Option(2000, help="Optimizer steps (batch 128)."),
    pool_size: int = typer.Option(60_000, help="Distinct rendered training images."),
    output: Path = typer.Option(ARTIFACTS_DIR, help="Where the weights and model card go."),
) -> None:
    """Train the built-in demo CLIP from scratch on synthetic coloured shapes (about 16 minutes on 2 cores)."""
    from models.demo.train import Recipe, train

    card = train(Recipe(seed=seed, steps=steps, pool_size=pool_size), output)
    training = card["training"]
    typer.echo(f"trained in {training['total_seconds']:.0f} s; final {training['final']}; written to {output}")


def _demo_encoders(artifacts: Path):  # type: ignore[no-untyped-def]
    """The demo model and its numpy encoders, on 2 torch threads (this project's CI machine), for the evaluations."""
    import torch

    from models.tokenizer import ClipTokenizer, open_clip_tokenizer_json
    from models.zoo import load_demo

    torch.set_num_threads(2)
    model = load_demo(artifacts)
    return (model, *model.numpy_encoders(ClipTokenizer.from_json(open_clip_tokenizer_json())))


@needs_extras("eval-demo", "cpu", "export")
def eval_demo(
    images_per_task: int = typer.Option(1000, help="Freshly rendered images per task and distribution."),
    report: Path = typer.Option(REPORT_PATH, help="Markdown report to write."),
    artifacts: Path = typer.Option(ARTIFACTS_DIR, help="Demo model directory (weights + model card)."),
) -> None:
    """Zero-shot accuracy of the demo model on fresh renderings; writes a Markdown report."""
    from models.demo import evaluate
    from models.demo.checkpoint import read_card

    _, encode_images, encode_texts = _demo_encoders(artifacts)
    card = read_card(artifacts)

    started = time.perf_counter()
    results = evaluate.evaluate(encode_images, encode_texts, images_per_task, progress=typer.echo)
    training = card["training"]
    header = "\n".join(
        [
            "# Built-in demo model: zero-shot report",
            "",
            f"Written by `clipserve eval-demo` ({images_per_task} fresh images per task, eval seed "
            f"{evaluate.EVAL_SEED}, {time.perf_counter() - started:.0f} s). Model trained by "
            f"`{card['reproduce']}` in {training['total_seconds'] / 60:.1f} min ({training['machine']}, "
            f"torch {training['torch']}); final training batch top-1 {training['final']['batch_top1']:.1%}.",
            "Held out of training entirely: " + ", ".join(card["held_out_compositions"]) + ".",
            "Top-1 accuracy. Prompt settings: the bare label, the single template, and the paper's 80 ImageNet",
            "templates averaged (renormalised mean of the template embeddings).",
        ]
    )
    report.write_text(evaluate.markdown_report(results, header))
    typer.echo(report.read_text())
    verdict = evaluate.meets_targets(results)
    typer.echo("targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in verdict.items()))


@needs_extras("eval-fewshot", "cpu", "export")
def eval_fewshot(
    images_per_task: int = typer.Option(1000, help="Freshly rendered evaluation images per task."),
    draws: int = typer.Option(5, min=1, help="Independent draws of the examples; each cell is their mean."),
    report: Path = typer.Option(FEWSHOT_REPORT_PATH, help="Markdown report to write."),
    artifacts: Path = typer.Option(ARTIFACTS_DIR, help="Demo model directory (weights + model card)."),
) -> None:
    """Few-shot accuracy of the demo model with 0-32 example images per label; writes a Markdown report."""
    from models.demo import fewshot

    model, encode_images, encode_texts = _demo_encoders(artifacts)
    started = time.perf_counter()
    results = fewshot.evaluate_fewshot(
        encode_images, encode_texts, model.logit_scale, images_per_task, draws, progress=typer.echo
    )
    header = "\n".join(
        [
            "# Built-in demo model: few-shot examples",
            "",
            f"Written by `clipserve eval-fewshot` ({images_per_task} fresh images per task, examples rendered at "
            f"seeds distinct from the evaluation's, {time.perf_counter() - started:.0f} s). Top-1 accuracy; label "
            "vectors from the 80-template ensemble.",
        ]
    )
    report.write_text(fewshot.markdown_report(results, header, draws))
    typer.echo(report.read_text())


def register(app: typer.Typer) -> None:
    app.command("train-demo")(train_demo)
    app.command("eval-demo")(eval_demo)
    app.command("eval-fewshot")(eval_fewshot)
