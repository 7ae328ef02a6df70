"""``triage completion bash|zsh`` and ``triage-admin completion bash|zsh``: print the script that
makes the shell complete the program's commands and options, to eval or source, as
``kubectl completion`` does::

    eval "$(triage-admin completion bash)"     # in ~/.bashrc
    eval "$(triage-admin completion zsh)"      # in ~/.zshrc

The shell is named, never detected. The script calls the program again (by name, so it must be
on PATH) with ``_TRIAGE_ADMIN_COMPLETE=complete_bash`` (or ``_TRIAGE_COMPLETE=complete_zsh``
...) set; Typer answers that before any command runs, so completing loads no settings and opens
no database.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

# Typer's own completion protocol (the scripts and the classes that answer them): private
# modules, but the ones `--install-completion` uses, so the script and the answer always match
# the installed Typer.
from typer._completion_classes import completion_init
from typer._completion_shared import get_completion_script


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"


_ZSH_COMPINIT = "(( $+functions[compdef] )) || { autoload -Uz compinit && compinit; }"
"""compdef comes with compinit: load it when ~/.zshrc has not."""


def completion_script(program: str, shell: Shell) -> str:
    """The script that completes ``program`` in ``shell``."""
    complete_var = "_{}_COMPLETE".format(program.replace("-", "_").upper())
    script = get_completion_script(prog_name=program, complete_var=complete_var, shell=shell)
    if shell is Shell.zsh:
        first, _, rest = script.partition("\n")  # the `#compdef PROGRAM` line stays first
        script = f"{first}\n{_ZSH_COMPINIT}\n{rest}"
    return script


def register(app: typer.Typer) -> None:
    """Add ``completion`` to ``app``, and let it answer the shell's completion requests."""
    program = app.info.name
    if not isinstance(program, str):
        raise TypeError("the app needs a name: the script calls the program by it")
    # Without this (add_completion=False does not call it) Typer knows no shell and answers
    # every completion request with "Shell bash not supported".
    completion_init()

    @app.command(
        "completion",
        short_help="Print the script that makes bash or zsh complete commands and options.",
        help=(
            f'Print the shell completion script: add `eval "$({program} completion bash)"` to '
            f'~/.bashrc, or `eval "$({program} completion zsh)"` to ~/.zshrc.'
        ),
    )
    def completion(
        shell: Annotated[Shell, typer.Argument(help="The shell to complete in.")],
    ) -> None:
        print(completion_script(program, shell))
