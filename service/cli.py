"""The `clipserve` command.

The service owns the CLI; commands from packages the service must not import (the demo trainer in
`models`, `export` and `build-engines` in `export`) are discovered through the `clipserve.commands` entry-point
group, each a `register(app)` function, and imported only when the CLI starts.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import typer

app = typer.Typer(help="clipserve: zero-shot image classification with CLIP.", no_args_is_help=True)
log = logging.getLogger(__name__)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to bind (default: CLIPSERVE_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default: CLIPSERVE_PORT or 8000)."),
) -> None:
    """Start the HTTP service (settings from CLIPSERVE_* environment variables; see the README)."""
    import uvicorn

    from models.settings import read_settings
    from service.settings import Settings

    # One place reads the environment (invalid values stop here, one line each); the options only say where to listen.
    settings = read_settings(Settings, "serve")
    # `is None`, not `or`: --port 0 asks for any free port and must reach uvicorn.
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
    )


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
