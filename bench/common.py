"""Helpers any benchmark can reuse: free ports, child processes that always stop, medians, and
a one-line description of the machine the figures were taken on."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

LOOPBACK = "127.0.0.1"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AE = "ORTHANC"


def argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``, described by the first line of its docstring."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=(doc or "").split("\n")[0]
    )


def emit(data: dict[str, Any], *, as_json: bool, text: Callable[[dict[str, Any]], None]) -> int:
    """Print a benchmark's report as JSON or as text; the exit status (0)."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        text(data)
    return 0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0.99 for p99), interpolated linearly between the two nearest
    samples as numpy's default does, so that a p99 of 200 samples is not just the maximum."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def clean_env(
    extra: Mapping[str, str] | None = None, *, drop_prefix: str = "TRIAGE_"
) -> dict[str, str]:
    """This process's environment without ``drop_prefix*`` variables, plus ``extra``.

    A benchmark must not pick up the caller's configuration (another database, another port).
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop_prefix)}
    env.update(extra or {})
    return env


@contextlib.contextmanager
def without_env(prefix: str = "TRIAGE_") -> Iterator[None]:
    """This process's environment without ``prefix*`` variables while the block runs, for a
    benchmark that builds Settings in-process (the caller's configuration must not leak in)."""
    saved = {key: value for key, value in os.environ.items() if key.startswith(prefix)}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


class ProcessError(RuntimeError):
    """A child process failed, or did not become ready in time."""


def wait_for_port(
    port: int,
    *,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 60.0,
    host: str = LOOPBACK,
) -> float:
    """Block until ``host:port`` accepts a TCP connection; return the seconds waited.

    Raises ProcessError if ``process`` exits first or ``timeout`` passes.
    """
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ProcessError(
                f"{process.args!r} exited with {process.returncode} before listening"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return time.monotonic() - started
        time.sleep(0.05)
    raise ProcessError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], *, grace: float = 15.0) -> int | None:
    """SIGTERM the process group ``process`` leads (started with ``start_new_session=True``),
    then SIGKILL it if it is still there after ``grace`` seconds. Returns the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)
    else:
        # The leader is gone; children it forked (storescp --fork) may not be.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in its own process group and stop the whole group when the block ends,
    on success and on failure alike. Output goes to ``log_path`` (or is discarded)."""
    with contextlib.ExitStack() as stack:
        output = (
            stack.enter_context(log_path.open("wb")) if log_path is not None else subprocess.DEVNULL
        )
        process = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_process(process)


def run_all(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float,
    log_dir: Path,
) -> float:
    """Start ``commands`` at the same moment, wait for all; return the wall-clock seconds from
    the first start to the last exit. Raises ProcessError on a non-zero exit or the timeout
    (every process still running is killed first)."""
    processes: list[subprocess.Popen[bytes]] = []
    logs = [log_dir / f"client-{index}.log" for index in range(len(commands))]
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(path.open("wb")) for path in logs]
        started = time.perf_counter()
        try:
            for argv, output in zip(commands, outputs, strict=True):
                processes.append(
                    subprocess.Popen(
                        list(argv),
                        env=dict(env) if env is not None else None,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            deadline = started + timeout
            for process in processes:
                remaining = max(deadline - time.perf_counter(), 0.001)
                try:
                    process.wait(timeout=remaining)
                except subprocess.TimeoutExpired as exc:
                    raise ProcessError(
                        f"{argv_name(process)} still running after {timeout:g} s"
                    ) from exc
            elapsed = time.perf_counter() - started
        finally:
            for process in processes:
                stop_process(process, grace=2.0)
    for process, path in zip(processes, logs, strict=True):
        if process.returncode != 0:
            tail = path.read_text(errors="replace")[-2000:]
            raise ProcessError(f"{argv_name(process)} exited with {process.returncode}:\n{tail}")
    return elapsed


def argv_name(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    if isinstance(args, (list, tuple)) and args:
        return str(args[0])
    return str(args)


def descendants(pid: int) -> list[int]:
    """``pid``'s running children, grandchildren and so on (Linux)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds process ``pid`` and its running descendants (receiver
    processes behind ``triage serve``) have used so far (Linux), else None.

    On a shared machine CPU per unit of work is steadier than wall-clock time."""
    total = 0
    for process in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            if process == pid:
                return None
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User plus system CPU seconds of this process's children that have been waited for
    (``run_all``'s clients among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, idle) CPU seconds of the whole machine since boot, all cores (Linux), else None.

    Busy is every state but idle and iowait; taken before and after a run, it says how much of
    the machine's CPU the run used, and how much was left idle."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / tick, idle / tick


def machine() -> str:
    """CPU model, cores, memory and kernel: where the figures were taken."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 1024**2:.0f} GiB RAM"
                break
    return f"{cpu}, {os.cpu_count()} CPUs{memory}, Linux {platform.release()}"


def filesystem(path: Path) -> str:
    """Filesystem type and device of ``path`` (from /proc/mounts): fsync costs depend on it."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, *_ = line.split()
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best[0]):
                best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def venv_script(name: str) -> str:
    """The console script installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ProcessError(f"{name} is not installed")
    return found


@dataclass
class Server:
    name: str
    base: str  # the DICOMweb root URL, no trailing slash
    headers: dict[str, str]
    pid: int
    dicom_port: int | None = None  # Orthanc's DICOM port (its AE title is ORTHANC_AE)


@contextlib.contextmanager
def orthanc_server(work: Path) -> Iterator[Server]:
    """Orthanc from Debian's packages with its DICOMweb plugin, storing in ``work/orthanc``,
    fsyncing each file; it accepts C-STORE from any caller on its DICOM port."""
    if not (Path(ORTHANC).exists() and ORTHANC_DICOMWEB.exists()):
        raise ProcessError(
            "Orthanc and its DICOMweb plugin are missing: apt-get install orthanc orthanc-dicomweb"
        )
    storage, http_port, dicom_port = work / "orthanc", free_port(), free_port()
    storage.mkdir()
    config = {
        "Name": "BENCH",
        "DicomAet": ORTHANC_AE,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageCompression": False,
        "SyncStorageArea": True,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_file = work / "orthanc.json"
    config_file.write_text(json.dumps(config))
    with running([ORTHANC, str(config_file)], log_path=work / "orthanc.log") as process:
        wait_for_port(http_port, process=process, timeout=120)
        base = f"http://{LOOPBACK}:{http_port}"
        for _ in range(600):  # the port opens before the plugin has registered its routes
            try:
                if httpx.get(f"{base}/dicom-web/studies?limit=1").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield Server("orthanc", f"{base}/dicom-web", {}, process.pid, dicom_port)


def wait_warm(data_dir: Path, processes: int, *, log: Path | None = None) -> None:
    """Wait (up to 300 s) until ``processes`` worker processes have logged ``models warm``: in
    ``log`` (a ``triage worker``'s), or else in the local workers' logs of ``triage serve``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = [log] if log is not None else sorted((data_dir / "logs").glob("worker-*.log"))
        warm = sum(path.read_text().count("models warm") for path in logs if path.exists())
        if warm >= processes:
            return
        time.sleep(0.2)
    raise ProcessError(f"{processes} worker processes did not warm their models in 300 s")
