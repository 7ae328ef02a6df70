"""The embedded default's local workers: ``triage serve`` starts them, restarts any that die,
and stops them with itself. Each is ``python -m workers`` (triage never imports workers)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SECONDS = 15.0
RESTART_DELAY_SECONDS = 2.0


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if `triage serve` dies, even by SIGKILL, so no
    orphaned worker keeps consuming from a broker nobody watches."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalWorkers:
    def __init__(self, count: int, *, config_file: Path | None, log_dir: Path) -> None:
        self.count = count
        self.config_file = config_file
        self.log_dir = log_dir
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def _start_one(self, index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config_file is not None:
            env["TRIAGE_CONFIG"] = str(self.config_file)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "workers",
            "--queues", "inference,dispatch",
            "--pool", "solo",
            "--hostname", f"triage-local-{index}@%h",
        ]  # fmt: skip
        with (self.log_dir / f"worker-{index}.log").open("ab") as log_file:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        log.info("local worker started", extra={"worker": index, "pid": process.pid})
        return process

    def start(self) -> None:
        with self._lock:
            self._processes = [self._start_one(index) for index in range(self.count)]

    def watch(self, stopping: threading.Event) -> None:
        """Restart a worker that exited while triage is running."""
        while not stopping.wait(1.0):
            with self._lock:
                for index, process in enumerate(self._processes):
                    if process.poll() is not None and not stopping.is_set():
                        log.warning(
                            "local worker exited; restarting",
                            extra={"worker": index, "returncode": process.returncode},
                        )
                        time.sleep(RESTART_DELAY_SECONDS)
                        self._processes[index] = self._start_one(index)

    def stop(self) -> None:
        with self._lock:
            for process in self._processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_SECONDS
            for process in self._processes:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            self._processes = []
