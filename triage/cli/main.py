"""``triage``: run the daemon (``serve``) or a Celery worker (``worker``)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from triage.cli import completion
from triage.cli.common import (
    ConfigOption,
    OneLineErrors,
    add_version_option,
    exit_with_error,
    load_settings,
)

app = OneLineErrors(
    name="triage",
    pretty_exceptions_enable=False,
    help=(
        "Radiology triage beside the PACS: receives studies over DICOM, runs detection models "
        "and puts the most urgent studies at the top of the reading worklist."
    ),
    no_args_is_help=True,
    add_completion=False,
)


add_version_option(app, "triage")


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
    for setting, host, port in (
        ("dicom_port", settings.dicom_host, settings.dicom_port),
        ("http_port", settings.http_host, settings.http_port),
    ):
        if (problem := _cannot_listen(host, port)) is not None:
            exit_with_error(
                f"cannot listen on {host or '*'}:{port} ({setting}): {problem}; stop the program "
                f"using it (`ss -ltnp 'sport = :{port}'` shows it) or set {setting}"
            )
    try:
        TriageService(settings, config_file=config).run()
    except DataDirInUseError as exc:
        exit_with_error(str(exc))


def _cannot_listen(host: str, port: int) -> str | None:
    """Why nothing could listen on ``host:port`` now (None: it could)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


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


completion.register(app)
