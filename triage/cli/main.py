"""``triage``: run the daemon (``serve``) or a Celery worker (``worker``)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from triage import __version__
from triage.cli.common import ConfigOption, exit_with_error, load_settings

app = typer.Typer(
    name="triage",
    help=(
        "Radiology triage beside the PACS: receives studies over DICOM, runs detection models "
        "and puts the most urgent studies at the top of the reading worklist."
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"triage {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """triage command line."""


@app.command()
def serve(
    config: ConfigOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Local worker processes in the embedded default (overrides the workers setting).",
            min=0,
        ),
    ] = None,
) -> None:
    """Run the DICOM listener, the study completion watcher and the web server.

    With no broker_url configured this is the embedded default: a SQLite database and broker
    in data_dir and local worker processes, nothing else to install. The database schema is
    upgraded on start.
    """
    from triage.errors import DataDirInUseError
    from triage.service import TriageService

    settings = load_settings(config)
    if workers is not None:
        settings = settings.model_copy(update={"workers": workers})
    try:
        TriageService(settings, config_file=config).run()
    except DataDirInUseError as exc:
        exit_with_error(str(exc))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(
    ctx: typer.Context,
    config: ConfigOption = None,
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated queues to consume.")
    ] = "inference,dispatch",
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Worker processes (one per GPU is typical).")
    ] = 1,
) -> None:
    """Run a Celery worker for inference and result dispatch (one per GPU machine).

    Extra options are passed to ``celery worker``.
    """
    settings = load_settings(config)  # fail here, with one line, on a bad configuration
    argv = [
        sys.executable,
        "-m",
        "workers",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        *ctx.args,
    ]
    if config is not None:
        os.environ["TRIAGE_CONFIG"] = str(config)
    os.environ["TRIAGE_LOG_LEVEL"] = settings.log_level
    # The worker is its own process: triage never imports workers.
    os.execv(sys.executable, argv)  # noqa: S606
