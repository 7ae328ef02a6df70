"""Shell completion of ``triage`` and ``triage-admin`` in bash and zsh: the script
``PROGRAM completion SHELL`` prints is loaded into a real shell, which is asked to complete
a command line as it would on Tab. Completing loads no settings: every test runs with a
configuration file that does not exist and a database URL that is not one."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.helpers.process import VENV_BIN

pytestmark = pytest.mark.slow  # each completion runs the program: about 2 s

PROGRAMS = ("triage", "triage-admin")

# (command line up to the cursor, a completion it must offer)
CASES = [
    ("triage-admin sta", "status"),
    ("triage-admin failures ", "list"),
    ("triage-admin failures retry --a", "--all"),
    ("triage-admin worklist --o", "--output"),
    ("triage-admin completion ", "zsh"),
    ("triage-admin --version sta", "status"),  # the eager --version prints nothing here
    ("triage se", "serve"),
    ("triage worker --q", "--queues"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("completion")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    """The programs on PATH, and settings that could not be loaded: a completion that loaded
    them would fail."""
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "TRIAGE_CONFIG": str(home / "no-such-config.toml"),
        "TRIAGE_DATABASE_URL": "not a database url",
        "TRIAGE_DATA_DIR": str(home / "no-data-dir"),
        "TERM": "dumb",
        "LANG": "C.UTF-8",
    }


def scripts(shell: str, env: Mapping[str, str], where: Path) -> list[Path]:
    """``PROGRAM completion SHELL`` of both programs, in files to source."""
    files = []
    for program in PROGRAMS:
        result = subprocess.run(
            [str(VENV_BIN / program), "completion", shell],
            env=env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        files.append(where / f"{program}.{shell}")
        files[-1].write_text(result.stdout)
    return files


@pytest.fixture(scope="module")
def bash_scripts(env: dict[str, str], home: Path) -> list[Path]:
    return scripts("bash", env, home)


@pytest.fixture(scope="module")
def zsh_scripts(env: dict[str, str], home: Path) -> list[Path]:
    return scripts("zsh", env, home)


BASH_COMPLETE = r"""
source "$1"; source "$2"
read -r -a COMP_WORDS <<< "$3"
[[ "$3" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE=$3; COMP_POINT=${#3}
# the function `complete` registered for the program, called as bash calls it on Tab
spec=$(complete -p "${COMP_WORDS[0]}") || exit 4
[[ $spec =~ -F\ ([^ ]+) ]] || exit 5
"${BASH_REMATCH[1]}" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf 'REPLY:%s\n' "${COMPREPLY[@]}"
"""


def bash_completions(env: Mapping[str, str], files: list[Path], line: str) -> list[str]:
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_COMPLETE, "bash", *map(str, files), line],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return [x.removeprefix("REPLY:") for x in result.stdout.splitlines() if x.startswith("REPLY:")]


# zsh completes only in its line editor: an interactive zsh on a pseudo-terminal (zpty) loads
# compinit and the scripts, is sent the line and a Tab, and prints each match compadd is given.
ZSH_SETUP = r"""
PROMPT=''
autoload -Uz compinit && compinit -u -D
source "$TRIAGE_TEST_SCRIPT_1"; source "$TRIAGE_TEST_SCRIPT_2"
bindkey '^I' complete-word
zstyle ':completion:*' insert-tab false
_capture_begin() { print -r -- '<<BEGIN>>' }
_capture_end() { print -r -- '<<END>>'; exit }
compprefuncs=(_capture_begin)
comppostfuncs=(_capture_end)
compadd() {
    if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then  # asked for the matches, not adding
        builtin compadd "$@"
        return $?
    fi
    local -a __hits
    builtin compadd -A __hits "$@"
    print -rl -- ${^__hits/#/MATCH:}
}
print -r -- '<<READY>>'
"""

ZSH_DRIVE = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "source ${(q)1}"
local line
while zpty -r z line; do [[ $line == *'<<READY>>'* ]] && break; done
zpty -w z "$2"$'\t'
while zpty -r z line; do print -r -- "${line%$'\r'}"; [[ $line == *'<<END>>'* ]] && break; done
zpty -d z
"""


def zsh_completions(env: Mapping[str, str], files: list[Path], line: str) -> list[str]:
    setup = files[0].parent / "setup.zsh"
    if not setup.exists():
        setup.write_text(ZSH_SETUP)
    scripts_env = {f"TRIAGE_TEST_SCRIPT_{i}": str(f) for i, f in enumerate(files, 1)}
    result = subprocess.run(
        ["zsh", "-f", "-c", ZSH_DRIVE, "zsh", str(setup), line],
        env={**env, **scripts_env}, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<<END>>" in result.stdout, result.stdout
    return [x.removeprefix("MATCH:") for x in result.stdout.splitlines() if x.startswith("MATCH:")]


def assert_offers(offered: list[str], line: str, expected: str, home: Path) -> None:
    """``expected`` is among the completions ``offered`` for ``line``, each of them completes its
    last word, and completing created no data directory."""
    assert expected in offered, offered
    word = line.rpartition(" ")[2]
    assert all(x.startswith(word) for x in offered), offered
    assert not (home / "no-data-dir").exists()


@pytest.mark.parametrize(("line", "expected"), CASES)
def test_bash_completes_commands_and_options(
    env: dict[str, str], bash_scripts: list[Path], home: Path, line: str, expected: str
) -> None:
    assert_offers(bash_completions(env, bash_scripts, line), line, expected, home)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (scripts/setup)")
@pytest.mark.parametrize(("line", "expected"), CASES)
def test_zsh_completes_commands_and_options(
    env: dict[str, str], zsh_scripts: list[Path], home: Path, line: str, expected: str
) -> None:
    assert_offers(zsh_completions(env, zsh_scripts, line), line, expected, home)


def test_the_scripts_name_their_program_and_shell(
    env: dict[str, str], bash_scripts: list[Path], zsh_scripts: list[Path]
) -> None:
    bash_triage, bash_admin = (f.read_text() for f in bash_scripts)
    assert "complete -o default -F _triage_admin_completion triage-admin" in bash_admin
    assert "_TRIAGE_COMPLETE=complete_bash" in bash_triage
    assert zsh_scripts[1].read_text().startswith("#compdef triage-admin\n")
    wrong = subprocess.run(
        [str(VENV_BIN / "triage-admin"), "completion", "tcsh"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert wrong.returncode == 2


@pytest.mark.parametrize("program", ["triage.cli.admin", "triage.cli.main"])
def test_completing_loads_no_dicom_or_model_libraries(program: str) -> None:
    """Each Tab imports the command line: the DICOM toolkits and torch wait for a command that
    needs them, so completion answers without their half second."""
    heavy = ["pydicom", "pynetdicom", "torch", "highdicom"]
    probe = f"import sys, {program}; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run(
        [str(VENV_BIN / "python"), "-c", probe],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert loaded.stdout.strip() == "[]"
