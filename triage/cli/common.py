"""What both command lines share: loading settings once, and failing with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from triage.config import Settings
from triage.errors import ConfigError
from triage.logs import configure_logging

EXIT_CONFIG = 2

err_console = Console(stderr=True, highlight=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="TRIAGE_CONFIG",
        help="TOML configuration file. Every setting can also be given as TRIAGE_<FIELD>.",
        show_envvar=True,
    ),
]

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings(config: Path | None) -> Settings:
    """Settings from the file and environment, or exit 2 with one line that names the field."""
    try:
        settings = Settings.load(config)
    except ConfigError as exc:
        exit_with_error(str(exc), EXIT_CONFIG)
    configure_logging(settings.log_level)
    return settings
