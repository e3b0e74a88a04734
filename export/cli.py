"""`clipserve export`: one model in, one gated model directory (and optionally a Triton repository) out.

Registered into the `clipserve` CLI through the `clipserve.commands` entry point, so the service never
imports this package; torch and the model loaders are imported only when the command runs. The CLIPSERVE_*
variables both commands read come from `models.settings.SharedSettings`, the model the service's settings extend.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer

from models.demo.config import EXPORT_NAME
from models.extras import needs_extras
from models.settings import SharedSettings, read_settings

DEFAULT_REPOSITORY = Path("model-repository")


def default_repository(settings: SharedSettings) -> Path:
    """Where `clipserve export` writes: CLIPSERVE_MODEL_REPOSITORY, else ./model-repository (not the built-in demo
    repository the service falls back to, which is part of the package)."""
    return settings.model_repository or DEFAULT_REPOSITORY


def default_name(model: str | None, pretrained: str | None, checkpoint: Path | None, hf_dir: Path | None) -> str:
    if hf_dir is not None:
        base = hf_dir.resolve().name
    else:
        suffix = pretrained if pretrained and not Path(pretrained).is_file() else None
        base = "-".join(part for part in (model, suffix or (checkpoint.stem if checkpoint else None)) if part)
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "model"


def _echo(message: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


@needs_extras("export", "cpu", "export")
def export_command(
    model: str | None = typer.Option(None, "--model", help="open_clip architecture, e.g. ViT-B-32."),
    pretrained: str | None = typer.Option(
        None, help="open_clip pretrained tag (downloads) or local weights file; omit for random init."
    ),
    checkpoint: Path | None = typer.Option(None, help="Local open_clip checkpoint for --model (sha256 recorded)."),
    hf_dir: Path | None = typer.Option(None, help="Hugging Face CLIPModel directory (save_pretrained output)."),
    demo: bool = typer.Option(False, "--demo", help="The built-in demo model."),
    model_config: Path | None = typer.Option(
        None, help="Extra open_clip model config (JSON) to register, for custom architectures named by --model."
    ),
    name: str | None = typer.Option(None, help="Directory name in the repository (default: from the model)."),
    formats: str = typer.Option(
        "onnx,onnx-fp16,onnx-int8", help="Comma-separated: onnx, onnx-fp16, onnx-int8, tensorrt."
    ),
    repository: Path | None = typer.Option(
        None, help=f"Model repository (default: $CLIPSERVE_MODEL_REPOSITORY, else ./{DEFAULT_REPOSITORY})."
    ),
    triton: Path | None = typer.Option(None, help="Also write a Triton Inference Server repository here."),
    max_batch_size: int | None = typer.Option(
        None,
        help="The service's max batch: TensorRT's optimisation batch and Triton's max_batch_size "
        "(default: $CLIPSERVE_MAX_BATCH_SIZE, else 32).",
    ),
    trt_max_batch: int = typer.Option(64, help="Largest batch a TensorRT engine accepts."),
    trt_precision: str = typer.Option("fp16", help="TensorRT engine precision: fp16, bf16 or fp32."),
    timing_cache: Path | None = typer.Option(None, help="TensorRT timing cache file (read and updated)."),
    report: Path | None = typer.Option(None, help="Also write the parity report as Markdown here."),
) -> None:
    """Export a CLIP model to ONNX (fp32, fp16, int8) and TensorRT, gated on parity with PyTorch."""
    settings = read_settings(SharedSettings, "export")
    max_batch_size = settings.max_batch_size if max_batch_size is None else max_batch_size
    from export import pipeline

    sources = [model is not None, hf_dir is not None, demo]
    if sum(sources) != 1:
        raise typer.BadParameter("give exactly one of --model, --hf-dir or --demo")
    if checkpoint is not None and model is None:
        raise typer.BadParameter("--checkpoint needs --model (the architecture it was trained with)")
    try:
        format_list = pipeline.parse_formats(formats)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    name = name or (EXPORT_NAME if demo else default_name(model, pretrained, checkpoint, hf_dir))
    try:
        pipeline.check_name(name)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--name") from error
    if "tensorrt" in format_list:
        _require_tensorrt()  # before minutes of export work, not after

    from models import zoo

    loaded, task = _load(zoo, model, pretrained, checkpoint, hf_dir, demo, model_config)
    target_repository = repository or default_repository(settings)
    _echo(f"exporting {loaded.name} as {name} into {target_repository} ({', '.join(format_list)})")
    trt_options = pipeline.TensorRTOptions(
        precision=trt_precision, opt_batch=max_batch_size, max_batch=trt_max_batch, timing_cache=timing_cache
    )
    try:
        result = pipeline.export_model(
            loaded,
            name,
            target_repository,
            formats=format_list,
            zero_shot_task=task,
            tensorrt=trt_options,
            progress=_echo,
        )
    except pipeline.parity.ParityError as error:
        _echo(str(error))
        raise typer.Exit(1) from error
    _echo(f"wrote {result.directory} in {result.seconds:.1f} s")
    from export.report import parity_markdown

    table = parity_markdown(result.manifest)
    typer.echo(table, err=True)
    if report is not None:
        report.write_text(table)
    if triton is not None:
        from export.triton import write_for_manifest

        configs = write_for_manifest(result.directory, result.manifest, triton, max_batch_size=max_batch_size)
        _echo(f"wrote Triton repository {triton}: {', '.join(str(c.parent.name) for c in configs)}")


def _require_tensorrt() -> None:
    from models.extras import TensorRTUnavailableError, load_tensorrt

    try:
        load_tensorrt()
    except TensorRTUnavailableError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


def _load(zoo, model, pretrained, checkpoint, hf_dir, demo, model_config):  # type: ignore[no-untyped-def]
    if demo:
        from export.probes import demo_zero_shot_task
        from models.tokenizer import ClipTokenizer, open_clip_tokenizer_json

        loaded = zoo.load_demo()
        tokenizer = ClipTokenizer.from_json(open_clip_tokenizer_json(), loaded.tokenizer)
        return loaded, demo_zero_shot_task(tokenizer, loaded.tokenizer)
    if hf_dir is not None:
        return zoo.load_hf_clip(hf_dir), None
    if model_config is not None:
        zoo.register_open_clip_config(model_config)
    if checkpoint is not None:
        return zoo.load_open_clip_checkpoint(checkpoint, model), None
    return zoo.load_open_clip(model, pretrained), None


def build_engines_command(
    repository: Path | None = typer.Option(
        None,
        help="Model repository (default: $CLIPSERVE_MODEL_REPOSITORY, else the built-in demo repository, as the "
        "service).",
    ),
    model: str | None = typer.Option(
        None, help="Model name in it (default: $CLIPSERVE_MODEL, else the only model there, as the service)."
    ),
    precision: str | None = typer.Option(
        None,
        help="Precision of the plans: fp16, bf16 (Ampere+) or fp32 (default: $CLIPSERVE_TENSORRT_PRECISION, else "
        "fp16).",
    ),
    max_batch_size: int | None = typer.Option(
        None,
        help="The service's max batch: the batch TensorRT optimises for (default: $CLIPSERVE_MAX_BATCH_SIZE, else 32).",
    ),
    trt_max_batch: int = typer.Option(64, help="Largest batch the engines accept."),
    timing_cache: Path | None = typer.Option(None, help="TensorRT timing cache file (read and updated)."),
) -> None:
    """Build TensorRT plans for this machine's GPU into an exported model, unless it already has them.

    The gpu image runs this before serving: plans only load on the GPU family and TensorRT release that built
    them, so they are built on the node, once, and kept next to the model on its volume.
    """
    from export.tensorrt_build import PRECISIONS, EngineBuildError, NoGpuError
    from export.tensorrt_plans import PlanDirectoryError, TensorRTOptions, ensure_plans
    from models.extras import TensorRTUnavailableError
    from models.manifest import ManifestError
    from models.repository import ModelNotFoundError, model_directory

    settings = read_settings(SharedSettings, "build-engines")
    if precision is not None and precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r}: choose one of {', '.join(PRECISIONS)}", param_hint="--precision")
    precision = precision or settings.tensorrt_precision
    max_batch_size = settings.max_batch_size if max_batch_size is None else max_batch_size
    options = TensorRTOptions(
        precision=precision,
        opt_batch=max_batch_size,
        max_batch=max(trt_max_batch, max_batch_size),
        timing_cache=timing_cache,
    )
    try:
        directory = model_directory(repository or settings.model_repository, model or settings.model)
        build, built = ensure_plans(directory, options, progress=_echo)
    # What this machine or model cannot do; ValueError: a precision the GPU or TensorRT release lacks (bf16 before
    # Ampere). Exit 2, like a missing TensorRT, so the entrypoint stops with the reason instead of a traceback.
    except (
        ModelNotFoundError,
        ManifestError,
        TensorRTUnavailableError,
        NoGpuError,
        PlanDirectoryError,
        ValueError,
    ) as error:
        _echo(f"error: {error}")
        raise typer.Exit(2) from error
    except (EngineBuildError, OSError) as error:  # the build itself failed, or writing its plans (disk full)
        _echo(f"error: {error}")
        raise typer.Exit(1) from error
    state = "built" if built else "found"
    _echo(f"{state} TensorRT plans {directory / build.directory} ({build.gpu_name}, {build.precision})")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("build-engines")(build_engines_command)
