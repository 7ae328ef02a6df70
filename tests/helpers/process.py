"""Run a real process for a test and wait until it is ready; its output goes to a log file."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from triage.config import Settings

VENV_BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def running(
    argv: list[str],
    *,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``; wait for ``ready``; on exit send SIGTERM, then SIGKILL after 15 s."""
    full_env = {**os.environ, **(env or {})}
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if ready is not None:

            def alive_and_ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{argv[0]} exited with {process.returncode}:\n{log_file.read_text()}"
                    )
                return ready()

            wait_for(alive_and_ready, timeout=timeout, what=f"{Path(argv[0]).name} to be ready")
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def serving(env: Mapping[str, str], log_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``triage serve`` on ``env`` (see ``serve_env``), once its HTTP port answers."""
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=log_file,
        ready=lambda: port_open(int(env["TRIAGE_HTTP_PORT"])),
    ) as process:
        yield process


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started that are still running (Linux), sorted."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:  # threads come and go
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return sorted(found)


def serve_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a ``triage serve`` under test: its own data directory and ports
    (``TRIAGE_DICOM_PORT``, ``TRIAGE_HTTP_PORT``), no workers, a spool reserve of 1 MB, and
    each of ``settings`` as ``TRIAGE_<NAME>``."""
    from tests.conftest import free_port

    return {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_WORKERS": "0",
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        **{f"TRIAGE_{name.upper()}": value for name, value in settings.items()},
    }


def run_admin(
    settings: Settings, *argv: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``triage-admin ARGV`` as a real process on ``settings``' database and data directory."""
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DATABASE_URL": settings.database_url,
        "TRIAGE_ROUTING_RULES": json.dumps([r.model_dump() for r in settings.routing_rules]),
        "COLUMNS": "200",
    }
    if settings.models_dir:
        env["TRIAGE_MODELS_DIR"] = str(settings.models_dir)
    return subprocess.run(
        [str(VENV_BIN / "triage-admin"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def admin_with(
    env: Mapping[str, str],
    *argv: str,
    columns: int | None = None,
    timeout: float = 120,
    program: str = "triage-admin",
) -> subprocess.CompletedProcess[str]:
    """``triage-admin ARGV`` (or ``program``) as a real process, with pipes for its output, on
    this environment plus ``env``; ``COLUMNS`` set to ``columns`` when given."""
    width: dict[str, str] = {} if columns is None else {"COLUMNS": str(columns)}
    return subprocess.run(
        [str(VENV_BIN / program), *argv],
        env={**os.environ, **width, **env},
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


def under_a_terminal(
    argv: list[str], env: Mapping[str, str], *, columns: int = 80
) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal of ``columns`` (and ``TERM=xterm``) as its stdin,
    stdout and stderr; its exit status and what it printed, with ``\\r\\n`` as ``\\n`` and
    without ANSI escape sequences."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    clean = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        argv, env={**clean, **env, "TERM": "xterm"}, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    out = bytearray()
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    status = process.wait(timeout=60)
    os.close(master)
    return status, ANSI.sub("", out.decode(errors="replace").replace("\r\n", "\n"))


def create_token(env: Mapping[str, str], name: str, role: str) -> str:
    """A new API token from ``triage-admin tokens create`` on the database ``env`` names."""
    return subprocess.run(
        [str(VENV_BIN / "triage-admin"), "tokens", "create", name, "--role", role],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
