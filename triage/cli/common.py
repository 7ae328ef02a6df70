"""What both command lines share: loading settings once, and failing with one clear line."""

from __future__ import annotations

import enum
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from triage import __version__
from triage.config import Settings, unknown_environment
from triage.db import migrate
from triage.db.session import SessionFactory, create_db_engine, make_session_factory
from triage.errors import ConfigError
from triage.logs import configure_logging

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 3
"""``triage-admin status``: something is down or failing (as ``systemctl status`` for a unit
that is not running)."""

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


class Output(enum.StrEnum):
    """``-o`` of the listing commands, as kubectl has it."""

    TABLE = "table"
    WIDE = "wide"
    NAME = "name"


OutputOption = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        help="table (fits the terminal; names are never cut), wide (a table whatever the "
        "width), or name (one name per line, for scripts).",
    ),
]


def print_names(names: list[str]) -> None:
    """``-o name``: each name once, in order, one per line."""
    for name in dict.fromkeys(names):
        print(name)


def local_time(iso: str | None, none: str = "-") -> str:
    """An ISO time in the local zone, to the second, as an administrator reads it; ``none``
    for no time."""
    if not iso:
        return none
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def reply(as_json: bool, data: Any, text: str) -> None:
    """A command's answer: ``data`` as JSON on stdout with ``--json``, else ``text``."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        Console(highlight=False).print(text, soft_wrap=True)


def warn(message: str) -> None:
    """One yellow ``warning:`` line on stderr: the command goes on."""
    err_console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


_loaded: list[Settings] = []  # the settings this command loaded, for its error messages


def load_settings(config: Path | None) -> Settings:
    """Settings from the file and environment, or exit 2 with one line that names the field."""
    try:
        settings = Settings.load(config)
    except ConfigError as exc:
        exit_with_error(str(exc), EXIT_CONFIG)
    configure_logging(settings.log_level)
    for warning in unknown_environment():
        warn(warning)
    _loaded[:] = [settings]
    return settings


def describe_failure(exc: Exception) -> str:
    """One line for an error no command handled itself: what failed, where, and the fix."""
    where = database_location(_loaded[0]) if _loaded else "the database"
    reason = _reason(exc)
    if isinstance(exc, SQLAlchemyError):
        lowered = reason.lower()
        if "no such table" in lowered or ("does not exist" in lowered and "relation" in lowered):
            return f"the {where} has no triage schema: run `triage-admin db upgrade`"
        return f"cannot use the {where}: {reason}"
    return f"{type(exc).__name__}: {reason} (run again with --debug for the traceback)"


class OneLineErrors(typer.Typer):
    """A Typer app whose unexpected errors end in one line and exit status 1; ``--debug``
    (anywhere on the command line) shows the traceback instead."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        debug = "--debug" in sys.argv
        if debug:
            sys.argv.remove("--debug")
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if debug:
                raise
            err_console.print(f"[bold red]error:[/] {describe_failure(exc)}", soft_wrap=True)
            sys.exit(1)


def database_location(settings: Settings) -> str:
    """The database and data directory, as an error names them."""
    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    return f"database {shown} (data directory {settings.data_dir})"


def _sqlite_file(settings: Settings) -> str | None:
    url = make_url(settings.database_url)
    file = url.database if url.get_backend_name() == "sqlite" else None
    return file if file and file != ":memory:" else None


def database_exists(settings: Settings) -> bool:
    """False only for a SQLite database whose file is not there (a server is asked instead)."""
    file = _sqlite_file(settings)
    return file is None or Path(file).is_file()


def open_database(settings: Settings) -> Engine:
    """An engine on the configured database for a command that only reads: it creates no file
    or directory, and exits 1 with one line when there is no database or no current schema."""
    file = _sqlite_file(settings)
    if file and not Path(file).is_file():
        exit_with_error(
            f"no database at {file} (data directory {settings.data_dir}): is TRIAGE_DATA_DIR "
            "or --config the one `triage serve` uses? A new installation needs `triage-admin "
            "db upgrade` (or `triage serve`) first"
        )
    engine = create_db_engine(settings.database_url)
    try:
        current = migrate.is_up_to_date(engine)
    except SQLAlchemyError as exc:
        exit_with_error(f"cannot read the {database_location(settings)}: {_reason(exc)}")
    if not current:
        exit_with_error(
            f"the schema of the {database_location(settings)} is not current: "
            "run `triage-admin db upgrade`"
        )
    return engine


def open_sessions(settings: Settings) -> SessionFactory:
    """Sessions on the configured database, checked as ``open_database`` checks it."""
    return make_session_factory(open_database(settings))


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig or exc).split())[:300]


def add_version_option(app: typer.Typer, program: str) -> None:
    """``PROGRAM --version`` prints ``PROGRAM <version>``."""

    def show(ctx: typer.Context, value: bool) -> None:
        if value and not ctx.resilient_parsing:  # not while the shell completes a command line
            print(f"{program} {__version__}")
            raise typer.Exit()

    option = typer.Option(
        False, "--version", callback=show, is_eager=True, help="Print the version."
    )

    @app.callback()
    def main(version: bool = option) -> None:  # a closure: Annotated would not see `show`
        pass
