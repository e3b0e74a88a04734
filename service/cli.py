"""The `clipserve` command.

The service owns the CLI; commands from packages the service must not import (the demo trainer in
`models`, `export` and `build-engines` in `export`) are discovered through the `clipserve.commands` entry-point
group, each a `register(app)` function, and imported only when the CLI starts.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path

import typer

app = typer.Typer(help="clipserve: zero-shot image classification with CLIP.", no_args_is_help=True)
log = logging.getLogger(__name__)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to bind (default: CLIPSERVE_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default: CLIPSERVE_PORT or 8000)."),
) -> None:
    """Start the HTTP service (settings from CLIPSERVE_* environment variables; see the README)."""
    import contextlib

    import uvicorn

    from models.settings import read_settings
    from service import logs
    from service.admission import DrainingServer
    from service.app import create_app
    from service.settings import Settings

    # One place reads the environment (invalid values stop here, one line each); the options only say where to listen.
    settings = read_settings(Settings, "serve")
    logs.configure(settings.log_format, settings.log_level)
    # The app object, not a factory string: the server and the app share its drain (service/admission.py).
    application = create_app(settings)
    drain = application.state.drain
    config = uvicorn.Config(
        application,
        # `is None`, not `or`: --port 0 asks for any free port and must reach uvicorn.
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        log_config=None,  # keep logs.configure's handler
        access_log=False,  # service.request_log writes the one line per request, with its id
        timeout_graceful_shutdown=drain.uvicorn_timeout_s,
    )
    server = DrainingServer(config, drain)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, re-raised by uvicorn once it has shut down
        server.run()
    if not server.started:
        raise typer.Exit(3)  # uvicorn's status for a failed startup


@app.command("upload-examples")
def upload_examples(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="One sub-folder of images per label."),
    classifier: str = typer.Option(..., "--classifier", "-c", help="Saved classifier (created if missing)."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The running service."),
    templates: str | None = typer.Option(None, help="Template preset when the classifier is created."),
    api_key: str | None = typer.Option(None, envvar="CLIPSERVE_API_KEY", help="Bearer key, if the service wants one."),
    batch: int = typer.Option(8, min=1, help="Images per request."),
) -> None:
    """Upload an ImageFolder to a saved classifier as few-shot examples (each sub-folder name is a label)."""
    from service.examples_upload import Client, image_folder, upload

    images = image_folder(folder)
    total = sum(len(paths) for paths in images.values())
    if not total:
        typer.echo(f"no images in the sub-folders of {folder}", err=True)
        raise typer.Exit(2)
    with typer.progressbar(length=total, label=f"{len(images)} labels, {total} images") as bar:
        try:
            report = upload(
                Client(url, api_key), classifier, images, templates=templates, batch=batch, progress=bar.update
            )
        except (RuntimeError, OSError) as error:
            typer.echo(f"\nclipserve upload-examples: {error}", err=True)
            raise typer.Exit(1) from None
    for line in report.refused:
        typer.echo(f"refused {line}", err=True)
    typer.echo(f"sent {report.sent} of {total} images to classifier {classifier!r}")
    if report.refused:
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="One sub-folder of images per class."),
    url: str | None = typer.Option(None, help="Evaluate a running service over HTTP instead of the engine."),
    repository: Path | None = typer.Option(None, help="Model repository (default: the built-in demo's)."),
    model: str | None = typer.Option(None, help="Model name in the repository."),
    templates: list[str] | None = typer.Option(
        None,
        help="Prompt setting: a preset (imagenet, simple, photo, bare) or a file of one template per line; "
        "repeatable. Default: bare label vs 'a photo of a {}.' vs the 80-template ensemble.",
    ),
    classifier: str | None = typer.Option(None, help="Evaluate a saved classifier (needs --url)."),
    class_map: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="Class names: a JSON object or 'folder<TAB>name' lines."
    ),
    limit_per_class: int | None = typer.Option(None, min=1, help="Use at most this many images per class."),
    out: Path = typer.Option(Path("eval-results"), help="Where eval.json and confusion.png go."),
    api_key: str | None = typer.Option(None, envvar="CLIPSERVE_API_KEY", help="Bearer key, if the service wants one."),
    batch: int | None = typer.Option(None, min=1, help="Images per HTTP request (default: the server's limit)."),
) -> None:
    """Zero-shot accuracy on a labelled image folder: top-1, top-5, per class, confusion matrix (engine or HTTP)."""
    import sys

    from service import evaluate as ev

    backend: ev.Backend | None = None
    try:
        if classifier is not None and url is None:
            raise ev.EvaluationError("--classifier needs --url: saved classifiers live in a running service")
        settings = ev.prompt_settings(templates or [], classifier)
        dataset = ev.load_folder(folder, ev.read_class_map(class_map) if class_map else None, limit_per_class)
        backend = ev.HttpBackend(url, api_key, batch) if url else ev.EngineBackend(repository, model)
        total = backend.work(len(dataset.images), len(settings))
        label = f"{len(dataset.classes)} classes, {len(dataset.images)} images"
        with typer.progressbar(length=total, label=label, file=sys.stderr) as bar:
            evaluation = ev.evaluate(backend, dataset, settings, bar.update)
    except (ev.EvaluationError, OSError) as error:
        typer.echo(f"clipserve eval: {error}", err=True)
        raise typer.Exit(2 if isinstance(error, ev.EvaluationError) else 1) from None
    finally:
        if backend is not None:
            backend.close()
    report, picture = ev.write_outputs(evaluation, out)
    typer.echo(ev.markdown(evaluation))
    typer.echo(f"wrote {report} and {picture}")


def _register_plugins() -> None:
    for entry_point in entry_points(group="clipserve.commands"):
        try:
            entry_point.load()(app)
        except ImportError as error:  # e.g. an extra that is not installed
            log.debug("clipserve command group %s unavailable: %s", entry_point.name, error)


def main() -> None:
    _register_plugins()
    app()


if __name__ == "__main__":
    main()
